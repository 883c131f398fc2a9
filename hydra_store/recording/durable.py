"""Durable points: what a recording writes so that `hydra-store record --resume` can continue it
after a kill, and continuing from them (docs/store-format.md, "Durable points").

A durable point holds everything the run needs to go on exactly as if it had not stopped: the
model's and the optimizer's state (weights, momentum buffers, learning rate), the tracked state
of each recurrence as it is in memory (the approximate recurrence's rows are not brought
forward: its lazy bookkeeping is saved with them, so no rounding differs from the run that
never stopped), the recorder's counters, the gradient log's length, and what the training loop
adds (its data-order generator, learning-rate schedule and place in the epoch). Everything
buffered is written first, so the per-step arrays reach the point. The store layer writes it
into the spare slot and commits it by one attribute (hydra_store/store/durable.py).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hydra_store.core.transfer import DeviceToHost, one_block_ahead
from hydra_store.errors import InvalidArgumentError, StoreCorruptError
from hydra_store.recording.gradient_log import cut_log, log_records
from hydra_store.store.arrays import create_array, matrix_chunks
from hydra_store.store.durable import (
    commit_durable_point,
    cut_back,
    fresh_slot,
    read_bytes,
    read_durable_point,
    root_array_shapes,
    slot_group,
    write_bytes,
)
from hydra_store.store.format import now_iso

if TYPE_CHECKING:
    from hydra_store.recording.recorder import HydraRecorder

# Version of what a slot's `state` holds.
STATE_VERSION = 1

# Rows of the tracked state written (or read) at once: whole chunks, a few at a time.
_BLOCK_CHUNKS = 8

# A test hook, read here only: `HYDRA_STORE_KILL_AT=place:n` makes the process kill itself with
# SIGKILL the n-th time it passes `place` ("step": after a training step; "durable": inside a
# durable point, its slot written but not committed; "final": inside the final write). The kill
# tests (tests/recording/test_durable.py) land there deterministically with it.
KILL_ENV = "HYDRA_STORE_KILL_AT"
_passes: dict[str, int] = {}


def kill_point(place: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != place:
        return
    _passes[place] = _passes.get(place, 0) + 1
    if _passes[place] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class DurableCost:
    seconds: float
    bytes: int  # uncompressed: the tracked state, plus the model, optimizer and counters


class DurableSchedule:
    """When the built-in run writes a durable point: once `seconds` have passed since the last
    one (or the start), and at least OVERHEAD times as long as the last one took, so that they
    cost at most about 1 / OVERHEAD of the run; checked after every step. 0: after every step;
    inf: never."""

    OVERHEAD = 10

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._since = time.monotonic()
        self._last_cost = 0.0
        self.written: list[DurableCost] = []

    def due(self) -> bool:
        if self.seconds == 0:
            return True
        if math.isinf(self.seconds):
            return False
        wait = max(self.seconds, self.OVERHEAD * self._last_cost)
        return time.monotonic() - self._since >= wait

    def note(self, cost: DurableCost) -> None:
        self.written.append(cost)
        self._last_cost = cost.seconds
        self._since = time.monotonic()


def write_durable_point(
    recorder: HydraRecorder, extra: Mapping[str, Any], position: Mapping[str, int]
) -> DurableCost:
    """Write a durable point of `recorder` (its buffers first) with the training loop's own
    state `extra` (tensors, numbers, strings, lists and dicts of them) and its `position` (at
    least `epoch` and `step_in_epoch`), and commit it."""
    started = time.perf_counter()
    recorder._flush()
    recorder.store.wait()
    group, path = recorder.store.group, recorder.path
    arrays = root_array_shapes(group)
    attributes = {k: v for k, v in group.attrs.items() if k != "durable_point"}
    slot, target = fresh_slot(group)
    written = 0
    for name, tracker in recorder._trackers():
        state = tracker.state
        dims = ("sample", recorder._dim(name))
        reads = [("h", state.read_rows)]
        if state.has_momentum:
            reads.append(("m", state.read_momentum_rows))
        for suffix, read in reads:
            written += _write_rows(target, f"{name}_{suffix}", state, read, dims)
    blob = _pack(recorder, extra)
    write_bytes(target, "state", blob)
    written += len(blob)
    kill_point("durable")
    cost = DurableCost(time.perf_counter() - started, written)
    point = {
        "slot": slot,
        "step": recorder.step_count,
        **{k: int(v) for k, v in position.items()},
        "checkpoints": int(arrays.get("checkpoint_step", [0])[0]),
        "written": now_iso(),
        "seconds": round(cost.seconds, 6),
        "bytes": cost.bytes,
        "arrays": arrays,
        "attributes": attributes,
    }
    commit_durable_point(path, group, point)
    return cost


def _write_rows(target, name, state, read, dims) -> int:
    dtype = torch.empty((), dtype=state.dtype).numpy().dtype
    chunk_rows = matrix_chunks(state.n_rows, state.width, dtype.itemsize)
    array = create_array(
        target, name, dims=dims, shape=(state.n_rows, state.width), dtype=dtype, chunks=chunk_rows
    )
    step = chunk_rows[0] * _BLOCK_CHUNKS
    to_host = DeviceToHost(state.device)

    def blocks():
        for start in range(0, state.n_rows, step):
            stop = min(state.n_rows, start + step)
            yield (
                slice(start, stop),
                to_host.to_host(read(start, stop), state.dtype, snapshot=False),
            )

    for rows, values in one_block_ahead(blocks()):
        array[rows] = values
    return state.n_rows * state.width * dtype.itemsize


def _tensors(value: Any) -> Any:
    """numpy arrays as tensors, so that the state loads with torch.load(weights_only=True)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    return value


def _pack(recorder: HydraRecorder, extra: Mapping[str, Any]) -> bytes:
    state = {
        "version": STATE_VERSION,
        "step_count": recorder.step_count,
        "epoch": recorder.epoch,
        "epochs": [[r.epoch, r.train_loss, r.test_loss, r.test_accuracy] for r in recorder.epochs],
        "epoch_losses": torch.tensor(recorder._epoch_losses, dtype=torch.float64),
        "epoch_samples": int(recorder._epoch_samples),
        "last_checkpoint_step": int(recorder._last_checkpoint_step),
        "batch_labels": _tensors(recorder._batch_labels),
        "digests": _tensors(getattr(recorder, "_digests", None)),
        "hooks_exact": None if recorder.sketched is None else recorder.sketched.hooks_exact,
        "model": recorder.model.state_dict(),
        "optimizer": recorder.optimizer.state_dict(),
        "trackers": {
            name: _tensors(tracker.lazy_state()) if hasattr(tracker, "lazy_state") else {}
            for name, tracker in recorder._trackers()
        },
        "exact_steps": None if recorder.exact is None else recorder.exact.step_count,
        "gradient_log": None
        if recorder._log is None
        else torch.from_numpy(log_records(recorder._log.folder, recorder.plan.n_partitions)),
        "torch_threads": torch.get_num_threads(),
        "extra": dict(extra),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def restore_durable_point(recorder: HydraRecorder) -> dict[str, Any]:
    """Cut the recorder's store back to its last durable point and put the recorder (model,
    optimizer, tracked state, counters, gradient log) back as it was there; returns the training
    loop's own state (`extra`) with the point's `position` under `"position"`."""
    group, path = recorder.store.group, recorder.path
    point = read_durable_point(group)
    if point is None:
        raise InvalidArgumentError(f"{path} has no durable point to resume from")
    try:
        slot = slot_group(group, int(point["slot"]))
        saved = torch.load(io.BytesIO(read_bytes(slot["state"])), weights_only=True)
    except (KeyError, ValueError, RuntimeError, OSError) as error:
        raise StoreCorruptError(
            f"{path} is damaged: its last durable point cannot be read ({error}); record it again"
        ) from None
    if saved.get("version") != STATE_VERSION or saved["step_count"] != point["step"]:
        raise StoreCorruptError(
            f"{path} is damaged: its last durable point does not match its state; record it again"
        )
    _check_same_run(recorder, point)
    cut_back(path, group, point)
    if recorder._log is not None:
        if saved["gradient_log"] is None:
            raise StoreCorruptError(f"{path}: its durable point has no gradient log length")
        cut_log(
            recorder._log.folder,
            saved["gradient_log"].numpy(),
            recorder._log.width,
            recorder._log.dtype,
        )
    recorder.model.load_state_dict(saved["model"])
    recorder.optimizer.load_state_dict(saved["optimizer"])
    for name, tracker in recorder._trackers():
        state = tracker.state
        h = slot[f"{name}_h"]
        m = slot[f"{name}_m"] if state.has_momentum else None
        if h.shape != (state.n_rows, state.width):
            raise StoreCorruptError(f"{path}: the durable point's {name} has shape {h.shape}")
        step = h.chunks[0] * _BLOCK_CHUNKS
        for start in range(0, state.n_rows, step):
            stop = min(state.n_rows, start + step)
            rows_h = torch.from_numpy(np.asarray(h[start:stop])).to(state.device)
            rows_m = None if m is None else torch.from_numpy(np.asarray(m[start:stop]))
            state.write_rows(
                start, stop, rows_h, None if rows_m is None else rows_m.to(state.device)
            )
        lazy = saved["trackers"].get(name) or {}
        if lazy:
            tracker.restore_lazy_state({k: _numpy(v) for k, v in lazy.items()})
    if recorder.exact is not None:
        recorder.exact.step_count = int(saved["exact_steps"])
    recorder.step_count = int(saved["step_count"])
    recorder.epoch = int(saved["epoch"])
    recorder.epochs = [_epoch_record(*row) for row in saved["epochs"]]
    recorder._epoch_losses = saved["epoch_losses"].tolist()
    recorder._epoch_samples = int(saved["epoch_samples"])
    recorder._last_checkpoint_step = int(saved["last_checkpoint_step"])
    if saved["batch_labels"] is not None:
        recorder._batch_labels = saved["batch_labels"].numpy().copy()
    if saved["digests"] is not None and hasattr(recorder, "_digests"):
        recorder._digests = saved["digests"].numpy().copy()
        recorder._digests_dirty = True  # written whole at the next flush
    if recorder.sketched is not None:
        recorder.sketched.hooks_exact = saved["hooks_exact"]
    # A user's loss settles its kind (classification or regression) at the first step.
    stored_loss = point["attributes"].get("loss")
    if isinstance(stored_loss, dict) and "classification" in stored_loss:
        kind = bool(stored_loss["classification"])
        if recorder.loss.classification != kind:
            recorder.loss = dataclasses.replace(recorder.loss, classification=kind)
    # A sum split over another number of threads rounds differently: go on with the count the
    # recording had (unless this machine has fewer cores).
    threads = saved.get("torch_threads")
    if threads and threads != torch.get_num_threads() and threads <= (os.cpu_count() or 0):
        torch.set_num_threads(int(threads))
    recorder._last_flush = time.monotonic()
    position = {k: int(point[k]) for k in ("step", "epoch", "step_in_epoch") if k in point}
    return {**saved["extra"], "position": position}


def _numpy(value: Any) -> Any:
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _epoch_record(epoch, train_loss, test_loss, test_accuracy):
    from hydra_store.recording.recorder import EpochRecord

    return EpochRecord(int(epoch), float(train_loss), float(test_loss), float(test_accuracy))


def _check_same_run(recorder: HydraRecorder, point: Mapping[str, Any]) -> None:
    """Refuse to continue a store with a recorder that is not its run's."""
    attrs = point["attributes"]
    ours = {
        "mode": recorder.mode,
        "n_tracked": recorder.selection.n_rows,
        "n_params": recorder.layout.n_params,
        "partitioned": recorder.partitioned,
    }
    theirs = {
        "mode": attrs.get("mode"),
        "n_tracked": attrs.get("n_tracked"),
        "n_params": attrs.get("n_params"),
        "partitioned": "partitions" in attrs,
    }
    for key, value in ours.items():
        if theirs[key] != value:
            raise InvalidArgumentError(
                f"{recorder.path} cannot be resumed by this run: its {key} is {theirs[key]}, "
                f"this run's {value}"
                + (
                    " (the tracked state no longer fits this machine's memory as it did; "
                    "resume it where more memory is free)"
                    if key == "partitioned"
                    else ""
                )
            )
    stored = np.asarray(recorder.store.group["sample"][...])
    if not np.array_equal(stored, recorder.selection.index):
        raise InvalidArgumentError(
            f"{recorder.path} cannot be resumed by this run: it tracks other samples"
        )
