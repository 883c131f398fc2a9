"""The built-in training run behind `hydra-store record`: data, model, SGD, schedule, recorder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.arguments import RecordConfig
from hydra_store.core.gradients import evaluate
from hydra_store.core.lr_schedules import EpochSchedule
from hydra_store.core.sketched_gradients import tensor_sketch_projector
from hydra_store.data.datasets import DatasetBundle
from hydra_store.data.models import build_model
from hydra_store.data.training_data import dataset_attrs, load_training_data
from hydra_store.errors import InvalidArgumentError
from hydra_store.recording.durable import (
    DurableCost,
    DurableSchedule,
    kill_point,
    write_durable_point,
)
from hydra_store.recording.memory import StatePlan, parse_size
from hydra_store.recording.partitions import TrainingData
from hydra_store.recording.recorder import EpochRecord, HydraRecorder
from hydra_store.store.format import check_output_path
from hydra_store.store.location import StorePath, tree_bytes


@dataclass(frozen=True)
class Progress:
    """What the CLI's progress bar shows; the library itself never prints."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    samples_per_second: float


@dataclass(frozen=True)
class RecordSummary:
    path: StorePath
    epochs: tuple[EpochRecord, ...]
    n_train: int
    n_tracked: int
    n_params: int
    seconds: float
    training_seconds: float
    samples_per_second: float
    store_bytes: int
    n_partitions: int = 1
    partition_seconds: float = 0.0
    # Durable points written (and their cost); the step a resumed run continued from.
    durable_points: tuple[DurableCost, ...] = ()
    resumed_from_step: int | None = None


def select_tracked(track: str, labels: np.ndarray, seed: int) -> np.ndarray:
    """'all'; a count drawn stratified by class (largest-remainder allocation); or an index file
    (.npy, or text with whitespace-separated integers)."""
    n = labels.size
    if track == "all":
        return np.arange(n)
    if track.isdigit():
        count = int(track)
        if count > n:
            raise InvalidArgumentError(
                f"--track {count}: the training set has only {n} samples; use --track all"
            )
        rng = np.random.default_rng([seed, 0x7AC4])
        classes, sizes = np.unique(labels, return_counts=True)
        quota = sizes * count / n
        take = np.floor(quota).astype(int)
        remainder = count - take.sum()
        take[np.argsort(-(quota - take), kind="stable")[:remainder]] += 1
        chosen = [
            rng.choice(np.nonzero(labels == c)[0], size=k, replace=False)
            for c, k in zip(classes, take, strict=True)
        ]
        return np.sort(np.concatenate(chosen))
    path = Path(track)
    try:
        index = (
            np.load(path)
            if path.suffix == ".npy"
            else np.array(path.read_text().split(), dtype=np.int64)
        )
    except (OSError, ValueError) as error:
        raise InvalidArgumentError(f"--track {track}: cannot read indices ({error})") from error
    index = np.asarray(index).reshape(-1)
    if index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise InvalidArgumentError(f"--track {track}: the file must hold integer indices")
    if index.min() < 0 or index.max() >= n or np.unique(index).size != index.size:
        raise InvalidArgumentError(f"--track {track}: indices must be distinct and lie in [0, {n})")
    return index.astype(np.int64)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
        )
    return torch.device(name)


@dataclass(frozen=True)
class PreparedRun:
    """Everything a run needs, built and validated before the store is created."""

    config: RecordConfig
    bundle: DatasetBundle
    train_labels: np.ndarray
    clean_labels: np.ndarray | None
    model: torch.nn.Module
    tracked: np.ndarray
    device: torch.device


def prepare_run(
    config: RecordConfig, *, tracked: np.ndarray | None = None, new_store: bool = True
) -> PreparedRun:
    """Validate the configuration and build data and model (nothing is written). A resumed run
    passes the stored `tracked` indices and `new_store=False` (its store exists)."""
    config.validate()
    device = resolve_device(config.device)
    bundle, noisy, clean = load_training_data(config)
    model = build_model(
        config.model,
        input_shape=bundle.input_shape,
        n_classes=len(bundle.class_names),
        seed=config.seed,
    ).to(device)
    if tracked is None:
        tracked = select_tracked(config.track, noisy, config.seed)
    if new_store:
        check_output_path(config.out, config.overwrite)
    return PreparedRun(
        config=config,
        bundle=bundle,
        train_labels=noisy,
        clean_labels=clean if config.label_noise > 0 else None,
        model=model,
        tracked=tracked,
        device=device,
    )


def record_run(
    config: RecordConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    prepared: PreparedRun | None = None,
    on_plan: Callable[[StatePlan], None] | None = None,
    partition_progress: Callable[[str, int, int], None] | None = None,
    resume: bool = False,
) -> RecordSummary:
    """Train with SGD and record the HyDRA hypergradients of the tracked samples into a store.

    `on_plan` hears, before training starts, where the tracked state will live (in memory, or
    partitions under the memory budget); `partition_progress(stage, done, total)` follows the
    partitions recorded after training. Durable points are written every
    `config.durable_seconds`; `resume` continues the stopped recording at `config.out` from
    its last one (recording/resume.py prepares the run from the store).
    """
    started = time.perf_counter()
    run = prepared or prepare_run(config)
    optimizer = torch.optim.SGD(
        run.model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    n_train = len(run.bundle.train.targets)
    steps_per_epoch = -(-n_train // config.batch_size)
    schedule = EpochSchedule(optimizer, config.schedule_spec(), steps_per_epoch * config.epochs)
    recorder = _open_recorder(run, optimizer, steps_per_epoch * config.epochs, resume=resume)
    if on_plan is not None and recorder.plan is not None:
        on_plan(recorder.plan)
    loop = _EpochLoop(run, recorder, schedule, progress)
    first_epoch, start_step, order = loop.restore(recorder.resumed)
    with recorder:
        for epoch in range(first_epoch, config.epochs):
            loop.run_epoch(epoch, start_step, order)
            start_step, order = 0, None
        finishing = time.perf_counter()
        recorder.finish(
            lambda done, total: kill_point("final"),
            training_data=TrainingData(run.model, loop.inputs, loop.labels),
            scheduler=config.scheduler,
            partition_progress=_killable(partition_progress),
        )
    return RecordSummary(
        path=recorder.path,
        epochs=tuple(recorder.epochs),
        n_train=n_train,
        n_tracked=int(run.tracked.size),
        n_params=recorder.layout.n_params,
        seconds=time.perf_counter() - started,
        training_seconds=loop.training_seconds,
        samples_per_second=loop.samples / max(loop.training_seconds, 1e-9),
        store_bytes=tree_bytes(recorder.path),
        n_partitions=recorder.plan.n_partitions if recorder.plan is not None else 1,
        partition_seconds=time.perf_counter() - finishing if recorder.partitioned else 0.0,
        durable_points=tuple(loop.durable.written),
        resumed_from_step=loop.resumed_from_step,
    )


def _killable(
    progress: Callable[[str, int, int], None] | None,
) -> Callable[[str, int, int], None]:
    """The partitions' progress, passing the test hook's "final" place (recording/durable.py)."""

    def report(stage: str, done: int, total: int) -> None:
        kill_point("final")
        if progress is not None:
            progress(stage, done, total)

    return report


def _open_recorder(
    run: PreparedRun, optimizer: torch.optim.Optimizer, planned_steps: int, *, resume: bool = False
) -> HydraRecorder:
    """The recorder of a built-in run, with the splits' labels and source indices stored (a
    resumed one finds them stored)."""
    config, bundle = run.config, run.bundle
    projector = None
    if config.project_dim is not None:
        projector = tensor_sketch_projector(run.model, config.project_dim, seed=config.seed)
    recorder = HydraRecorder(
        run.model,
        optimizer,
        config.out,
        n_train=len(bundle.train.targets),
        tracked=run.tracked,
        train_labels=run.train_labels,
        clean_labels=run.clean_labels,
        mode=config.mode,
        checkpoint_every=config.checkpoint_every,
        hypergradient_history=config.hypergradient_history,
        config=config.to_attrs(),
        attrs={"dataset": dataset_attrs(bundle, run.train_labels)},
        overwrite=config.overwrite,
        projector=projector,
        memory_budget=None if config.memory_budget is None else parse_size(config.memory_budget),
        device_memory_budget=(
            None
            if config.device_memory_budget is None
            else parse_size(config.device_memory_budget, "--device-memory-budget")
        ),
        workers=config.workers,
        planned_steps=planned_steps,
        planned_checkpoints=config.epochs // config.checkpoint_every + 2,
        planned_epochs=config.epochs,
        resume=resume,
    )
    if resume:
        return recorder
    store = recorder.store
    store.create_array("train_label", run.train_labels, dims=("train",))
    store.create_array("train_source_index", bundle.train.source_index, dims=("train",))
    store.create_array("test_label", bundle.test.targets.numpy(), dims=("test",))
    store.create_array("test_source_index", bundle.test.source_index, dims=("test",))
    if bundle.validation is not None:
        store.create_array(
            "validation_source_index", bundle.validation.source_index, dims=("validation",)
        )
    return recorder


class _EpochLoop:
    """One epoch of the built-in run: shuffled batches through the recorder, then the test
    metrics and the learning-rate schedule; durable points when they are due (after a step, or
    at the end of an epoch)."""

    def __init__(
        self,
        run: PreparedRun,
        recorder: HydraRecorder,
        schedule: EpochSchedule,
        progress: Callable[[Progress], None] | None,
    ) -> None:
        self.run, self.recorder, self.schedule, self.progress = run, recorder, schedule, progress
        self.inputs = run.bundle.train.inputs.to(run.device)
        self.labels = torch.from_numpy(run.train_labels).to(run.device)
        self.generator = torch.Generator().manual_seed(run.config.seed)
        self.n_train = len(run.bundle.train.targets)
        self.steps_per_epoch = -(-self.n_train // run.config.batch_size)
        self.training_seconds = 0.0
        self.samples = 0
        self.durable = DurableSchedule(run.config.durable_seconds)
        self.resumed_from_step: int | None = None

    def restore(self, saved: dict[str, Any] | None) -> tuple[int, int, torch.Tensor | None]:
        """Take back the loop's state saved at a durable point (None: a new run); returns where
        to go on: (epoch, steps of it already taken, that epoch's order or None)."""
        if saved is None:
            return 0, 0, None
        self.generator.set_state(saved["generator"])
        self.schedule.load_state_dict(saved["schedule"])
        position = saved["position"]
        self.resumed_from_step = position["step"]
        step_in_epoch = position["step_in_epoch"]
        return position["epoch"], step_in_epoch, saved["order"] if step_in_epoch else None

    def run_epoch(self, epoch: int, start_step: int = 0, order: torch.Tensor | None = None) -> None:
        config, device = self.run.config, self.run.device
        if order is None:
            order = torch.randperm(self.n_train, generator=self.generator)
        tick = time.perf_counter()
        done = 0
        for k in range(start_step, self.steps_per_epoch):
            start = k * config.batch_size
            index = order[start : start + config.batch_size]
            device_index = index.to(device)
            loss = self.recorder.step(self.inputs[device_index], self.labels[device_index], index)
            self.schedule.after_step()
            done += index.numel()
            if self.progress is not None:
                elapsed = time.perf_counter() - tick
                self.progress(
                    Progress(
                        epoch + 1,
                        config.epochs,
                        epoch * self.steps_per_epoch + k + 1,
                        self.steps_per_epoch * config.epochs,
                        loss,
                        done / elapsed if elapsed > 0 else 0.0,
                    )
                )
            kill_point("step")
            # The last step's point waits for the end of the epoch, a moment later.
            if k + 1 < self.steps_per_epoch and self.durable.due():
                self._durable_point(epoch, k + 1, order)
        self.training_seconds += time.perf_counter() - tick
        self.samples += done
        bundle, model = self.run.bundle, self.run.model
        test_loss, test_accuracy = evaluate(model, bundle.test.inputs, bundle.test.targets)
        record = self.recorder.end_epoch(test_loss=test_loss, test_accuracy=test_accuracy)
        monitored = record.train_loss
        if bundle.validation is not None:
            monitored += evaluate(model, bundle.validation.inputs, bundle.validation.targets)[0]
        self.schedule.after_epoch(monitored)
        if self.durable.due():
            self._durable_point(epoch + 1, 0, None)

    def _durable_point(self, epoch: int, step_in_epoch: int, order: torch.Tensor | None) -> None:
        """Write a durable point: `epoch` (0-based) goes on at step `step_in_epoch` of it, in
        `order` (None at the start of an epoch: drawn from the generator's saved state)."""
        extra = {
            "generator": self.generator.get_state(),
            "schedule": self.schedule.state_dict(),
            "order": order,
        }
        position = {"epoch": epoch, "step_in_epoch": step_in_epoch}
        self.durable.note(write_durable_point(self.recorder, extra, position))
