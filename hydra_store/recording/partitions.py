"""Out-of-core recording: the tracked samples in partitions that each fit the memory budget.

Training stores the weights before every step (`step_weights`) and a fingerprint of every
per-sample gradient (`gradient_fingerprint`, hydra_store.core.fingerprints). Each partition then
walks the stored steps on its own: at step t it loads w_{t-1}, computes the per-sample gradients
of its own samples in that step's batch (and, in the exact mode, the batch loss's Hessian-vector
products with its rows), and advances its rows by the same recurrence the in-memory recorder
runs. Nothing is trained again, so a partition's rows equal the in-memory recorder's whatever
machine computes them, and the partitions are independent tasks: local threads, a LocalCluster,
or a dask.distributed scheduler. Each writes its rows (whole chunks: partitions are aligned to
the store's row chunks) and then marks itself done in `partition_done`; a partition re-run after
a lost worker writes the same chunks again.

Why this design and not retraining each partition from the checkpoints, or a disk-backed state:
docs/scaling.md.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from hydra_store.core.fingerprints import (
    check_gradient_fingerprints,
    check_sgd_steps,
    fingerprint_direction,
)
from hydra_store.core.gradients import PerSampleGradients, slot_gradients
from hydra_store.core.hypergradient import (
    ApproximateHypergradient,
    ExactHypergradient,
    TrackedSelection,
    named_trackers,
)
from hydra_store.core.losses import PerSampleLoss, recorded_loss
from hydra_store.core.model_state import check_mask_device, needs_batch_forward, step_randomness
from hydra_store.core.parameters import ParameterLayout, set_flat_parameters
from hydra_store.core.projection import projector_from_attrs
from hydra_store.core.sgd import SGDSettings
from hydra_store.core.state import InMemoryTrackedState
from hydra_store.core.transfer import DeviceToHost, one_block_ahead
from hydra_store.errors import StoreFormatError
from hydra_store.execution import map_tasks
from hydra_store.recording.gradient_log import GradientLogReader, log_folder, remove_log
from hydra_store.store.arrays import writable
from hydra_store.store.format import open_group


@dataclass(frozen=True)
class TrainingData:
    """What the partitions need beside the store: the model (its architecture; the weights come
    from the store) and the whole training set, indexed as in the recorded batches; the loss
    (None: the one the store names)."""

    model: torch.nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: PerSampleLoss | None = None


@dataclass(frozen=True)
class PartitionLayout:
    """The partitions of a store, from its `partitions` attribute."""

    n_rows: int
    rows_per_partition: int

    @classmethod
    def of(cls, group: zarr.Group) -> PartitionLayout:
        info = group.attrs.get("partitions")
        if not info:
            raise StoreFormatError("this store was not recorded in partitions")
        return cls(int(group.attrs["n_tracked"]), int(info["rows"]))

    def rows(self, partition: int) -> tuple[int, int]:
        start = partition * self.rows_per_partition
        return start, min(self.n_rows, start + self.rows_per_partition)


def pending_partitions(group: zarr.Group) -> list[int]:
    """Partitions not yet marked done."""
    done = np.asarray(group["partition_done"][:])
    return [int(p) for p in np.nonzero(~done)[0]]


def run_partitions(
    path: str | Path,
    data: TrainingData | None,
    *,
    scheduler: str = "threads",
    workers: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[float]:
    """Record every pending partition of a store; returns each one's seconds.

    With `data` None the model and training set are rebuilt from the store's configuration
    (only built-in runs carry one), once here; on a cluster they are sent to each worker once.
    """
    group = open_group(path)
    check_recorded_steps(group)
    pending = pending_partitions(group)
    n_steps = int(group["lr"].shape[0])
    total = len(pending) * n_steps
    counter = _StepCounter(total, progress)
    local = scheduler in (None, "", "threads")
    pool = StatePool(PartitionLayout.of(group).rows_per_partition) if local else None
    data = data or _data_from_store(str(path))
    # One task per worker, each recording its share of the partitions one after another with
    # one state buffer (a fresh multi-GiB buffer per partition costs seconds of page zeroing).
    shares = [pending[k::workers] for k in range(workers) if pending[k::workers]]
    arguments = [(str(path), share, counter.step if local else None, pool) for share in shares]

    def on_task(description: str, done: int, count: int) -> None:
        if not local:
            counter.set(sum(len(share) for share in shares[:done]) * n_steps)

    seconds = map_tasks(
        record_partitions,
        arguments,
        scheduler=scheduler,
        n_workers=workers,
        progress=on_task,
        description="partitions",
        shared=(data,),
    )
    remove_log(path)
    return [s for share in seconds for s in share]


class StatePool:
    """Tracked-state buffers handed from one partition to the next in one process, so that
    each partition does not allocate (and the kernel zero) its gigabytes afresh.

    Every buffer has `rows` rows (the largest partition's), whatever the partition that asks
    first: tasks run in any order, and a buffer sized for a smaller last partition would not
    serve the next one."""

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows
        self._free: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._lent: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._lock = threading.Lock()

    def take(
        self, n_rows: int, width: int, *, has_momentum: bool, dtype: torch.dtype, device
    ) -> InMemoryTrackedState:
        with self._lock:
            for k, (h, m) in enumerate(self._free):
                if (
                    h.shape[0] >= n_rows
                    and h.shape[1] == width
                    and h.dtype == dtype
                    and h.device == torch.device(device)
                    and (m is not None) == has_momentum
                ):
                    del self._free[k]
                    state = InMemoryTrackedState.on_buffers(h, m, n_rows)
                    self._lent[id(state)] = (h, m)
                    return state
        full = InMemoryTrackedState(
            max(n_rows, self.rows), width, has_momentum=has_momentum, dtype=dtype, device=device
        )
        state = InMemoryTrackedState.on_buffers(full.h, full.m, n_rows)
        with self._lock:
            self._lent[id(state)] = (full.h, full.m)
        return state

    def give_back(self, state: InMemoryTrackedState) -> None:
        with self._lock:
            buffers = self._lent.pop(id(state), None)
            if buffers is not None:
                self._free.append(buffers)


class _StepCounter:
    """Steps done over all partitions, reported as one progress stage."""

    def __init__(self, total: int, progress: Callable[[str, int, int], None] | None) -> None:
        self.total, self.progress = total, progress
        self.done = 0
        self.lock = threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.done += 1
            if self.progress is not None and (self.done % 16 == 0 or self.done == self.total):
                self.progress("partition steps", self.done, self.total)

    def set(self, done: int) -> None:
        with self.lock:
            self.done = done
            if self.progress is not None:
                self.progress("partition steps", done, self.total)


def check_recorded_steps(group: zarr.Group, *, block: int = 256) -> float:
    """The SGD-update check of every stored step (hydra_store.core.fingerprints), reading the
    per-step weights once in blocks (or their stored components along u, for a recording whose
    partitions read a gradient log); returns the largest error relative to its tolerance."""
    info = group.attrs["partitions"]
    direction = fingerprint_direction(int(group.attrs["n_params"]), info["fingerprint_seed"])
    u = direction.numpy()
    n_steps = int(group["lr"].shape[0])
    if n_steps == 0:
        return 0.0
    epsilon = float(np.finfo(group["weights"].dtype).eps) / 2
    final = np.asarray(group["weights"][-1], dtype=np.float64)
    dots, abs_dots = np.empty(n_steps + 1), np.empty(n_steps + 1)
    if "step_weights" in group:
        weights = group["step_weights"]
        for start in range(0, n_steps, block):
            stop = min(n_steps, start + block)
            rows = np.asarray(weights[start:stop], dtype=np.float64)
            dots[start:stop] = rows @ u
            abs_dots[start:stop] = np.abs(rows) @ np.abs(u)
    else:
        dots[:-1] = np.asarray(group["step_weight_dot"][:])
        abs_dots[:-1] = np.asarray(group["step_weight_abs_dot"][:])
    dots[-1], abs_dots[-1] = final @ u, np.abs(final) @ np.abs(u)
    batches = np.asarray(group["batch_index"][:])
    fingerprints = np.asarray(group["gradient_fingerprint"][:])
    mean = np.where(batches >= 0, fingerprints, 0.0).sum(axis=1) / (batches >= 0).sum(axis=1)
    velocity = np.asarray(group["velocity"][0], dtype=np.float64)
    return check_sgd_steps(
        dots,
        abs_dots,
        float(velocity @ u),
        np.asarray(group["lr"][:]),
        np.asarray(group["momentum"][:]),
        np.asarray(group["weight_decay"][:]),
        mean,
        epsilon=epsilon,
    )


def record_partitions(
    data: TrainingData,
    path: str,
    partitions: list[int],
    on_step: Callable[[], None] | None = None,
    pool: StatePool | None = None,
) -> list[float]:
    """Record the given partitions one after another, skipping any already marked done (a
    task re-run after its worker was lost starts where that worker stopped)."""
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    pool = pool or StatePool(PartitionLayout.of(group).rows_per_partition)
    seconds = []
    for partition in partitions:
        if bool(group["partition_done"][partition]):
            continue
        seconds.append(record_partition(data, path, partition, on_step, pool))
    return seconds


def record_partition(
    data: TrainingData,
    path: str,
    partition: int,
    on_step: Callable[[], None] | None = None,
    pool: StatePool | None = None,
) -> float:
    """Record one partition's rows into the store and mark it done; returns its seconds.

    `pool`: state buffers shared with the partitions run before and after this one in the
    same process (local threads)."""
    started = time.perf_counter()
    _one_thread_per_cluster_worker()
    group = zarr.open_group(path, mode="r+", use_consolidated=False)
    run = _PartitionRun(group, path, partition, data, pool)
    try:
        run.record(on_step)
    finally:
        run.release()
    writable(group["partition_done"])[partition] = True
    return time.perf_counter() - started


class _PartitionRun:
    """One partition walking the stored steps."""

    def __init__(
        self,
        group: zarr.Group,
        path: str,
        partition: int,
        data: TrainingData,
        pool: StatePool | None,
    ) -> None:
        attrs: dict[str, Any] = group.attrs.asdict()
        info = attrs["partitions"]
        self.group, self.partition = group, partition
        self.start, self.stop = PartitionLayout.of(group).rows(partition)
        self.model = copy.deepcopy(data.model)
        param = next(self.model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.inputs, self.targets = data.inputs, data.targets
        self.layout = ParameterLayout.from_attrs(attrs["parameter_layout"])
        self.projector = projector_from_attrs(attrs.get("projection"), self.layout.n_params)
        index = np.asarray(group["sample"][self.start : self.stop])
        self.selection = TrackedSelection(int(attrs["n_train"]), index)
        state_dtype = getattr(torch, info["state_dtype"])
        momentum = bool(info["has_momentum"])
        mode = attrs["mode"]
        loss = data.loss or recorded_loss(attrs.get("loss"), None)

        self.pool = pool or StatePool()
        self.to_host = DeviceToHost(self.device)

        def state(width: int) -> InMemoryTrackedState:
            return self.pool.take(
                self.selection.n_rows,
                width,
                has_momentum=momentum,
                dtype=state_dtype,
                device=self.device,
            )

        self.approximate = (
            ApproximateHypergradient(state(self.projector.width), self.selection)
            if mode in ("approximate", "both")
            else None
        )
        self.exact = (
            ExactHypergradient(
                state(self.layout.n_params), self.selection, self.model, self.layout, loss=loss
            )
            if mode in ("exact", "both")
            else None
        )
        self.per_sample = PerSampleGradients(self.model, self.layout, loss)
        self.model.train()
        self.seeds = np.asarray(group["step_seed"][:]) if "step_seed" in group else None
        self.log = (
            GradientLogReader(
                log_folder(path),
                partition,
                self.projector.width,
                np.float64 if state_dtype == torch.float64 else np.float32,
            )
            if info.get("gradient_log")
            else None
        )
        if self.log is None and self.seeds is not None:  # it draws the masks again
            drawn = group["step_seed"].attrs.get("device", "cpu")
            check_mask_device(drawn, self.device, path, "its partitions need")
        self.direction = fingerprint_direction(self.layout.n_params, info["fingerprint_seed"]).to(
            self.device
        )
        self.history = bool(attrs.get("hypergradient_history_recorded", False))
        steps = np.asarray(group["checkpoint_step"][:])
        self.checkpoint_at = {int(s): c for c, s in enumerate(steps)}

    def release(self) -> None:
        """Hand the state buffers back to the pool for the next partition; close the log."""
        if self.log is not None:
            self.log.close()
        for _, tracker in self._trackers():
            self.pool.give_back(tracker.state)

    def _trackers(self):
        return named_trackers(self.approximate, self.exact)

    def record(self, on_step: Callable[[], None] | None) -> None:
        if self.log is not None:
            self._record_from_log(on_step)
        else:
            self._record_recomputing(on_step)
        for name, tracker in self._trackers():
            self._write_rows(self.group[name], (), tracker)

    def _settings(self, first: int, last: int) -> list[SGDSettings]:
        g = self.group
        return [
            SGDSettings(float(a), float(b), float(c))
            for a, b, c in zip(
                g["lr"][first:last],
                g["momentum"][first:last],
                g["weight_decay"][first:last],
                strict=True,
            )
        ]

    def _record_from_log(self, on_step: Callable[[], None] | None) -> None:
        """The approximate recurrence fed with the logged gradients of the partition's own
        samples: no gradient is computed again."""
        g = self.group
        n_steps = int(g["lr"].shape[0])
        block = 4096
        if 0 in self.checkpoint_at:
            self._write_history(0)
        for first in range(0, n_steps, block):
            last = min(n_steps, first + block)
            sizes = (np.asarray(g["batch_index"][first:last]) >= 0).sum(axis=1)
            settings = self._settings(first, last)
            steps, rows, gradients = self.log.until(last)
            bounds = np.searchsorted(steps, np.arange(first + 1, last + 2))
            for k in range(last - first):
                a, b = bounds[k], bounds[k + 1]
                self.approximate.step(
                    self.selection.index[rows[a:b]],
                    torch.from_numpy(gradients[a:b]).to(self.device, self.approximate.state.dtype),
                    settings[k],
                    batch_size=int(sizes[k]),
                )
                if first + k + 1 in self.checkpoint_at:
                    self._write_history(self.checkpoint_at[first + k + 1])
                if on_step is not None:
                    on_step()

    def _record_recomputing(self, on_step: Callable[[], None] | None) -> None:
        """Per-sample gradients of the partition's samples computed again at the stored
        weights (the exact recurrence needs each step's weights and batch anyway)."""
        g = self.group
        n_steps = int(g["lr"].shape[0])
        block = max(1, g["step_weights"].chunks[0])
        if 0 in self.checkpoint_at:
            self._write_history(0)
        for first in range(0, n_steps, block):
            last = min(n_steps, first + block)
            weights = np.asarray(g["step_weights"][first:last])
            batches = np.asarray(g["batch_index"][first:last])
            fingerprints = np.asarray(g["gradient_fingerprint"][first:last])
            scales = np.asarray(g["gradient_scale"][first:last])
            settings = self._settings(first, last)
            for k in range(last - first):
                row = batches[k]
                slots = np.nonzero(row >= 0)[0]
                self._step(
                    first + k + 1,
                    row[slots],
                    weights[k],
                    fingerprints[k, slots],
                    float(scales[k]),
                    settings[k],
                )
                if first + k + 1 in self.checkpoint_at:
                    self._write_history(self.checkpoint_at[first + k + 1])
                if on_step is not None:
                    on_step()

    def _write_rows(self, array: zarr.Array, prefix: tuple, tracker) -> None:
        """The partition's rows into `array[*prefix, start:stop]`, one chunk of rows at a time
        (so that the encoder's buffers stay at a chunk, not the whole partition)."""
        block, target, n_rows = array.chunks[len(prefix)], writable(array), self.selection.n_rows

        def blocks():
            for first in range(0, n_rows, block):
                last = min(n_rows, first + block)
                rows = self.to_host.to_host(tracker.hypergradient_rows(first, last))
                yield (*prefix, slice(self.start + first, self.start + last)), rows

        for key, rows in one_block_ahead(blocks()):
            target[key] = rows

    def _step(
        self,
        step: int,
        batch: np.ndarray,
        weights: np.ndarray,
        fingerprints: np.ndarray,
        scale: float,
        settings: SGDSettings,
    ) -> None:
        mine = np.nonzero(self.selection.row_of[batch] >= 0)[0]
        flat = torch.from_numpy(weights).to(self.device, self.dtype)
        gradients = torch.empty(0, self.layout.n_params, dtype=self.dtype, device=self.device)
        seed = None if self.seeds is None else int(self.seeds[step - 1])
        if mine.size:
            set_flat_parameters(self.model, self.layout, flat)
            # A batch-coupled model's gradients come from the forward pass of the whole batch,
            # one backward vector for each of the partition's own slots.
            coupled = needs_batch_forward(self.model)
            index = torch.from_numpy(batch if coupled else batch[mine])
            x = self.inputs[index].to(self.device, self.dtype)
            y = self.targets[index].to(self.device)
            with step_randomness(seed, self.device):
                if coupled:
                    slots = torch.from_numpy(mine).to(self.device)
                    gradients = slot_gradients(
                        self.model, self.layout, x, y, slots, self.per_sample.loss, mean=False
                    )[2]
                else:
                    gradients = self.per_sample(x, y)[1]
            check_gradient_fingerprints(
                gradients,
                self.direction,
                fingerprints[mine],
                step=step,
                samples=batch[mine],
                scale=scale,
            )
        if self.exact is not None:
            whole = torch.from_numpy(batch)
            with step_randomness(seed, self.device):
                self._exact_step(flat, whole, batch, mine, gradients, settings)
        if self.approximate is not None:
            projected = self.projector.project(gradients) if mine.size else gradients[:, :0]
            self.approximate.step(batch[mine], projected, settings, batch_size=batch.size)

    def _exact_step(self, flat, whole, batch, mine, gradients, settings) -> None:
        self.exact.step(
            flat,
            self.inputs[whole].to(self.device, self.dtype),
            self.targets[whole].to(self.device),
            batch,
            gradients,
            settings,
            batch_index_tracked=batch[mine],
        )

    def _write_history(self, checkpoint: int) -> None:
        if not self.history:
            return
        for name, tracker in self._trackers():
            self._write_rows(self.group[f"{name}_history"], (checkpoint,), tracker)


def _data_from_store(path: str) -> TrainingData:
    from hydra_store.replay.recorded_run import build_recorded_model, load_run_data

    group = open_group(path)
    dtype = torch.float64 if group["weights"].dtype == np.float64 else torch.float32
    train = load_run_data(path).train
    model = build_recorded_model(path, dtype=dtype)
    # On the device training ran on, where there is one: a run with dropout draws its masks
    # there (the partitions refuse another kind of device), a GPU records the partitions faster.
    if (group.attrs.get("config") or {}).get("device") == "cuda" and torch.cuda.is_available():
        model = model.to("cuda")
    return TrainingData(model, train.inputs, train.targets)


def _one_thread_per_cluster_worker() -> None:
    """On a dask.distributed worker, torch gets the worker's own thread count (one by default):
    several single-threaded workers on one machine, not each spawning a thread per core."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    torch.set_num_threads(max(1, int(worker.state.nthreads)))
