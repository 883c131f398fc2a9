"""The recorder: wraps a model and its torch.optim.SGD, takes each training step itself and
tracks the hypergradients of chosen training samples into a store.

    recorder = HydraRecorder(model, optimizer, "run.zarr", n_train=len(train_set))
    with recorder:
        for epoch in range(epochs):
            for inputs, targets, indices in loader:   # indices: training-set index of each sample
                recorder.step(inputs, targets, indices)
            recorder.end_epoch(test_loss=..., test_accuracy=...)

The step uses per-sample gradients (torch.func); their mean is the training gradient, so there
is no second backward pass. Under a `TensorSketchProjector` (`record --project-dim`) the
approximate mode never forms them: one forward and backward pass gives the training gradient and
each sample's projected gradient (core/sketched_gradients.py; the store's `step_gradient` says
how, for replay). lr, momentum and weight decay are read from the optimizer at every step, so
any scheduler works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hydra_store.arguments import MODES
from hydra_store.core.fingerprints import (
    estimated_gradient_scale,
    fingerprint_direction,
    gradient_fingerprints,
    gradient_scale,
    sample_digests,
)
from hydra_store.core.gradients import (
    PerSampleGradients,
    batch_gradient,
    batched_backward_gradients,
    slot_fingerprints,
    slot_gradients,
)
from hydra_store.core.host_staged_state import HostStagedTrackedState
from hydra_store.core.hypergradient import (
    ApproximateHypergradient,
    ExactHypergradient,
    TrackedSelection,
    named_trackers,
    tracked_variables,
)
from hydra_store.core.losses import BUILT_IN_LOSSES, LossFunction, PerSampleLoss, resolve_loss
from hydra_store.core.model_state import (
    BufferLayout,
    batch_norms,
    frozen_running_stats,
    has_dropout,
    needs_batch_forward,
    step_randomness,
    step_seed,
)
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
from hydra_store.core.projection import IdentityProjector, Projector, TensorSketchProjector
from hydra_store.core.sgd import (
    SGDSettings,
    check_optimizer_covers_model,
    read_sgd_settings,
    sgd_step,
    velocity_of,
)
from hydra_store.core.sketched_gradients import SketchedGradients
from hydra_store.core.state import InMemoryTrackedState, StateFactory, state_nbytes
from hydra_store.core.transfer import DeviceToHost
from hydra_store.data.models import check_supported_model
from hydra_store.errors import InvalidArgumentError, unwrap_interruption
from hydra_store.recording.durable import restore_durable_point
from hydra_store.recording.gradient_log import GradientLogWriter, log_folder
from hydra_store.recording.memory import (
    StatePlan,
    available_memory_bytes,
    check_disk_fits,
    check_state_fits,
    default_device_budget,
    default_memory_budget,
    plan_state,
)
from hydra_store.recording.named_run import resolve_named_run
from hydra_store.recording.partitions import TrainingData, run_partitions
from hydra_store.resources import device_free_memory_bytes
from hydra_store.store.arrays import matrix_chunks, writable
from hydra_store.store.format import STATUS_COMPLETE, STATUS_FAILED, consolidate, now_iso
from hydra_store.store.location import StorePath, is_url
from hydra_store.store.writer import RecordingStore


def software_versions() -> dict[str, str]:
    import dask
    import xarray
    import zarr

    from hydra_store import __version__

    return {
        "hydra_store": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "dask": dask.__version__,
        "xarray": xarray.__version__,
    }


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    test_loss: float
    test_accuracy: float


# Seed of the fingerprints' direction u: fixed, so that a run recorded twice gives the same
# store; the check needs u independent of the trajectory, not secret.
FINGERPRINT_SEED = 20210202


class HydraRecorder:
    """Record a training run and the HyDRA hypergradients of the tracked samples.

    Args:
        model: the network (BatchNorm and dropout included: core/model_state.py; layers whose
            steps cannot be replayed are refused, data/models.py `check_supported_model`).
        optimizer: a torch.optim.SGD over exactly `model.parameters()`, one param group,
            dampening 0, no Nesterov.
        store: path of the Zarr store to create.
        n_train: N, the size of the whole training set (the `N / B_t` of the recurrence).
        tracked: training-set indices to track (default: all N).
        train_labels: (N,) labels used in training; if not given, each tracked sample's label
            is taken from the batches it appears in (-1 for a sample never seen).
        clean_labels: (N,) labels before injected noise, when noise was injected.
        mode: "approximate" (the paper's Algorithm 1), "exact" (Hessian-aware, one HVP per
            tracked sample per step: hundreds of samples at most), "both", or "trajectory"
            (no hypergradients: only what replay and the reverse-mode analysis need, at the
            cost of plain training).
        checkpoint_every: epochs between weight checkpoints (`end_epoch` counts them).
        config: the run's configuration, stored as the `config` attribute.
        attrs: further root attributes (e.g. data-set fingerprints).
        state_dtype: dtype of the tracked state (default: the model's).
        hypergradient_history: also store h at every checkpoint as `hypergradient_history`
            (checkpoint, sample, param); written in the background while training goes on.
        flush_seconds: at most this long between writes of the buffered trajectory and
            checkpoints to the store (a crash loses at most that much of the record).
        overwrite: replace an existing store at `store`.
        state_factory: builds the tracked state of each recurrence (the tracked-state seam;
            default `InMemoryTrackedState`).
        projector: the linear map the tracked vectors are an image of (the projector seam;
            default: none, the full hypergradient). The exact mode needs the identity.
        memory_budget: bytes the tracked state may take (default: 80% of the memory available
            now). A state larger than that is recorded in partitions after training, from the
            stored per-step weights (hydra_store.recording.partitions, docs/scaling.md); then
            `finish` needs the training data.
        workers: partitions recorded at once (each holds its own share of the budget).
        device_memory_budget: for a model on a GPU, bytes of GPU memory the tracked state may
            take (default: 70% of the GPU's free memory now). A state over it but within
            `memory_budget` stays in host memory, each step's batch rows copied to the GPU and
            back through pinned buffers (core/host_staged_state.py), in the approximate mode;
            otherwise it is recorded in partitions that fit it.
        planned_steps, planned_checkpoints, planned_epochs: the run's length when known, for
            the up-front check that the store (and a partitioned run's gradient log) fits the
            free disk space.
        dataset_spec, model_spec: the data set and the model of a user's loop, by their specs
            (`digits`, `package.module:function`: the grammar of `record --dataset/--model`),
            with the `seed` and `data_root` they are loaded with. The store then names them,
            so that every analyser rebuilds them as for a built-in run; every batch is checked
            against the named data set (recording/named_run.py).
        sketch_gradients: with a `TensorSketchProjector` in the approximate mode, take the
            projected per-sample gradients from one backward pass without forming the
            per-sample gradients (the default). False: form them and project them, as any
            other projector does (to compare the two, or measure the difference).
        loss: the per-sample training loss: "cross-entropy" (the default), "mse", a
            `package.module:function` spec, or a function of (outputs, targets) returning one
            loss per sample (core/losses.py). It is stored by spec (root attribute `loss`), so
            that replay and every analyser rebuild it; a function with no import name must be
            passed again to the analysers. A user's loss is a classification loss when the
            targets are integers, a regression loss when they are floating point.
        resume: continue the stopped recording at `store` from its last durable point
            (hydra_store/recording/durable.py) instead of creating it: the store is cut back to
            that point and model, optimizer, tracked state and counters are put back as they
            were there; `self.resumed` then holds what the training loop saved with it. The
            other arguments must be the recording's own (`hydra-store record --resume` takes
            them from the store's `config`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        store: str | os.PathLike[str],
        *,
        n_train: int,
        tracked: Sequence[int] | np.ndarray | None = None,
        train_labels: Sequence[int] | np.ndarray | None = None,
        clean_labels: Sequence[int] | np.ndarray | None = None,
        mode: str = "approximate",
        checkpoint_every: int = 1,
        config: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
        state_dtype: torch.dtype | None = None,
        hypergradient_history: bool = False,
        flush_seconds: float = 5.0,
        overwrite: bool = False,
        state_factory: StateFactory = InMemoryTrackedState,
        projector: Projector | None = None,
        memory_budget: int | None = None,
        workers: int = 1,
        device_memory_budget: int | None = None,
        planned_steps: int | None = None,
        planned_checkpoints: int | None = None,
        planned_epochs: int | None = None,
        sketch_gradients: bool = True,
        dataset_spec: str | None = None,
        model_spec: str | None = None,
        seed: int = 0,
        data_root: str | None = None,
        loss: str | PerSampleLoss | LossFunction | None = None,
        resume: bool = False,
    ) -> None:
        self.loss = resolve_loss(loss)
        self._check_arguments(n_train, mode, checkpoint_every, hypergradient_history)
        check_supported_model(model)
        check_optimizer_covers_model(model, optimizer)
        settings = read_sgd_settings(optimizer)
        self._named = resolve_named_run(
            model,
            n_train,
            dataset_spec=dataset_spec,
            model_spec=model_spec,
            seed=seed,
            data_root=data_root,
            sgd=dataclasses.asdict(settings),
        )
        if self._named is not None:
            config = {**self._named.config, **(config or {})}
            attrs = {"dataset": self._named.dataset_attrs, **(attrs or {})}
            if train_labels is None:
                train_labels = self._named.train_labels
        self.model, self.optimizer, self.mode = model, optimizer, mode
        self.layout = ParameterLayout.from_model(model)
        self.projector = projector or IdentityProjector(self.layout.n_params)
        if self.projector.n_params != self.layout.n_params:
            raise InvalidArgumentError(
                f"the projector maps {self.projector.n_params} parameters; the model has "
                f"{self.layout.n_params}"
            )
        tracked_index = np.arange(n_train) if tracked is None else np.asarray(tracked, np.int64)
        self.selection = TrackedSelection(n_train, tracked_index)
        self.n_train = n_train
        self.checkpoint_every = checkpoint_every
        self.hypergradient_history = hypergradient_history
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self._to_host = DeviceToHost(self.device)
        labels = self._labels(train_labels, "train_labels")
        clean = self._labels(clean_labels, "clean_labels")
        self.state_dtype = state_dtype or self.dtype
        self.has_momentum = settings.momentum != 0
        self.plan = self._plan_state(state_factory, memory_budget, workers, device_memory_budget)
        self._check_disk(store, planned_steps, planned_checkpoints, planned_epochs)
        self._build_trackers(state_factory)
        self.per_sample = PerSampleGradients(model, self.layout, self.loss)
        # A batch-coupled model (BatchNorm, dropout) takes its per-sample gradients from one
        # forward pass of the batch; the sketch's hooks assume each loss sees its own sample.
        self.sketched = (
            SketchedGradients(model, self.layout, self.projector, loss=self.loss)
            if sketch_gradients
            and mode == "approximate"
            and isinstance(self.projector, TensorSketchProjector)
            and not needs_batch_forward(model)
            else None
        )
        self.seed = int(seed)
        self._draws_masks = has_dropout(model)
        self._batch_norm = bool(batch_norms(model))
        # A batch-coupled model's per-sample gradient costs about a backward pass each: a step
        # takes its tracked slots' rows and one backward pass for the mean gradient it steps
        # with (core.gradients.slot_gradients); a partitioned run fingerprints every slot by
        # one forward-mode pass (core.gradients.slot_fingerprints).
        self._tracked_slots_only = (
            mode != "trajectory"
            and self.sketched is None
            and (self._draws_masks or self._batch_norm)
        )
        self._forward_mode_fingerprints: bool | None = None  # None: not tried yet
        self._pending_seeds: list[int] = []
        self.buffer_layout = BufferLayout.from_model(model)
        self._fingerprint_seed = FINGERPRINT_SEED
        # On the model's device once, not copied there at every step (P float64 values).
        self._direction = fingerprint_direction(self.layout.n_params, self._fingerprint_seed).to(
            self.device
        )

        self._digests = np.zeros(n_train, dtype=np.uint64)
        self._digests_dirty = False
        self.store = RecordingStore(store, overwrite=overwrite, resume=resume)
        self.path = self.store.path
        if resume and self.store.group.attrs.get("step_gradient") == "per_sample_mean":
            self._tracked_slots_only = False  # go on as the store's first steps were taken
        self._finished = False
        if not resume:
            self._write_static(config, attrs, labels, clean)
        self._log = (
            GradientLogWriter(
                log_folder(self.path),
                self.plan.rows_per_partition,
                self.plan.n_partitions,
                self.projector.width,
                np.float64 if self.state_dtype == torch.float64 else np.float32,
            )
            if self._logs_gradients
            else None
        )
        self.step_count = 0
        self.epoch = 0
        self._pending: dict[str, list] = {k: [] for k in self._STEP_VARIABLES}
        self._pending_blocks: dict[str, list] = {k: [] for k in self._BLOCK_VARIABLES}
        self._pending_steps: dict[str, list] = self._empty_step_buffers()
        self._epoch_losses: list[float] = []
        self._epoch_samples = 0
        self.epochs: list[EpochRecord] = []
        # Labels of the tracked rows as seen in batches, when none were given.
        self._batch_labels = None if labels is not None else np.full(self.selection.n_rows, -1)
        self.flush_seconds = flush_seconds
        # With `resume`: the training loop's own state saved at the durable point, and where.
        self.resumed: dict[str, Any] | None = None
        if resume:
            try:
                self.resumed = restore_durable_point(self)
            except BaseException:
                self.store.release()
                raise
        else:
            self._checkpoint(epoch=0)
            self._flush()

    @staticmethod
    def _check_arguments(
        n_train: int, mode: str, checkpoint_every: int, hypergradient_history: bool
    ) -> None:
        if mode not in MODES:
            raise InvalidArgumentError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not isinstance(n_train, int) or n_train <= 0:
            raise InvalidArgumentError(f"n_train must be a positive integer, got {n_train!r}")
        if checkpoint_every < 1:
            raise InvalidArgumentError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if hypergradient_history and mode == "trajectory":
            raise InvalidArgumentError("a trajectory-only recording has no hypergradient history")

    @property
    def _widths(self) -> list[int]:
        """The tracked vectors' width of each recurrence the mode runs."""
        return [self._width(name) for name in tracked_variables(self.mode)]

    def _width(self, name: str) -> int:
        """The width of a hypergradient variable: the projection's, or the parameter count."""
        return self.projector.width if name == "hypergradient" else self.layout.n_params

    @property
    def partitioned(self) -> bool:
        return self.plan is not None and self.plan.partitioned

    @property
    def _logs_gradients(self) -> bool:
        """A partitioned projected recording keeps training's projected per-sample gradients
        in a log for its partitions (K floats a sample: cheap to write and read back, where
        computing them again costs a per-sample gradient each). A full-dimension one recomputes
        them: its log would be as large as the hypergradients, and writing and reading it back
        measured no faster than recomputing (docs/scaling.md). So does the exact recurrence,
        which needs each step's batch and weights for its Hessian-vector products anyway."""
        return self.partitioned and self.mode == "approximate" and not self.projector.is_identity

    def _plan_state(
        self,
        state_factory: StateFactory,
        memory_budget: int | None,
        workers: int,
        device_memory_budget: int | None,
    ) -> StatePlan | None:
        """Where the state lives (in memory, in host memory while the GPU computes, or
        partitions after training); None for a state backend of the caller's own or a
        trajectory-only recording."""
        if device_memory_budget is not None and self.device.type != "cuda":
            raise InvalidArgumentError(
                "--device-memory-budget is for a model on a GPU (--device cuda); this one is "
                f"on {self.device.type}"
            )
        if self.mode == "trajectory" or state_factory is not InMemoryTrackedState:
            return None
        per_row = sum(state_nbytes(1, w, self.has_momentum, self.state_dtype) for w in self._widths)
        available = available_memory_bytes()
        budget = default_memory_budget(available) if memory_budget is None else memory_budget
        device_budget = (
            default_device_budget(device_free_memory_bytes(self.device))
            if device_memory_budget is None
            else device_memory_budget
        )
        chunk_rows = matrix_chunks(self.selection.n_rows, max(self._widths))[0]
        return plan_state(
            self.selection.n_rows,
            per_row,
            budget=budget,
            budget_is_default=memory_budget is None,
            workers=workers,
            chunk_rows=chunk_rows,
            available=available,
            device_budget=device_budget,
            host_staging=self.mode == "approximate",
        )

    def _check_disk(
        self,
        store: str | os.PathLike[str],
        steps: int | None,
        checkpoints: int | None,
        epochs: int | None,
    ) -> None:
        rows = self.selection.n_rows * sum(self._widths) * 4
        needed = rows * (1 + (checkpoints or 1) * self.hypergradient_history)
        if self.partitioned and not self._logs_gradients and steps is not None:
            needed += steps * self.layout.n_params * self._itemsize
        log = 0
        if self._logs_gradients and epochs is not None:
            log = epochs * self.selection.n_rows * (self.projector.width * 4 + 16)
        if is_url(store):
            # Object storage has no free-space figure; the gradient log is local.
            check_disk_fits(log_folder(store), log, "the gradient log")
        else:
            check_disk_fits(store, needed + log, "the store")

    def _build_trackers(self, state_factory: StateFactory) -> None:
        """The approximate and/or exact recurrence of the mode, each over its own state (none
        when the state is recorded in partitions after training)."""

        def new_state(width: int):
            return state_factory(
                self.selection.n_rows,
                width,
                has_momentum=self.has_momentum,
                dtype=self.state_dtype,
                device=self.device,
            )

        if self.mode in ("exact", "both") and not self.projector.is_identity:
            raise InvalidArgumentError(
                "the exact mode tracks full hypergradients (Hessian-vector products need "
                "every parameter); record it without a projection"
            )
        self.approximate = self.exact = None
        if self.partitioned:
            return
        if self.plan is None and state_factory is InMemoryTrackedState:
            per_row = sum(
                state_nbytes(1, w, self.has_momentum, self.state_dtype) for w in self._widths
            )
            check_state_fits(self.selection.n_rows, per_row, available_memory_bytes())
        if self.plan is not None and self.plan.location == "host":
            state_factory = HostStagedTrackedState
        if self.mode in ("approximate", "both"):
            state = new_state(self.projector.width)
            self.approximate = ApproximateHypergradient(state, self.selection)
        if self.mode in ("exact", "both"):
            state = new_state(self.layout.n_params)
            self.exact = ExactHypergradient(
                state, self.selection, self.model, self.layout, loss=self.loss
            )

    # Per-step weights buffered before a write (partitioned recordings): 64 MiB.
    STEP_BUFFER_BYTES = 64 * 2**20

    _STEP_VARIABLES = ("batch_index", "lr", "momentum", "weight_decay", "step_epoch", "batch_loss")

    def _labels(self, labels, name: str) -> np.ndarray | None:
        if labels is None:
            return None
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (self.n_train,):
            raise InvalidArgumentError(
                f"{name} must have shape ({self.n_train},), got {labels.shape}"
            )
        return labels

    def _write_static(self, config, attrs, labels, clean) -> None:
        s, lay, n_rows = self.store, self.layout, self.selection.n_rows
        s.create_array("sample", self.selection.index, dims=("sample",))
        row_labels = labels[self.selection.index] if labels is not None else np.full(n_rows, -1)
        s.create_array("label", row_labels, dims=("sample",))
        if clean is not None:
            s.create_array("clean_label", clean[self.selection.index], dims=("sample",))
            is_noisy = clean[self.selection.index] != row_labels
            s.create_array("is_noisy", is_noisy, dims=("sample",))
        s.create_array("layer_name", np.array(lay.names, dtype=object), dims=("layer",))
        s.create_array("layer_offset", np.array(lay.offsets, dtype=np.int64), dims=("layer",))
        s.create_array("layer_size", np.array(lay.sizes, dtype=np.int64), dims=("layer",))
        param_chunks = matrix_chunks(1, lay.n_params, self._itemsize)
        for name in ("weights", "velocity"):
            s.create_array(
                name,
                dims=("checkpoint", "param"),
                shape=(0, lay.n_params),
                dtype=self._weights_dtype,
                chunks=param_chunks,
            )
        for name in ("checkpoint_step", "checkpoint_epoch"):
            s.create_array(name, dims=("checkpoint",), shape=(0,), dtype=np.int64, chunks=(4096,))
        if self.buffer_layout.size:
            s.create_array(
                "buffers",
                dims=("checkpoint", "buffer"),
                shape=(0, self.buffer_layout.size),
                dtype=np.float64,
                chunks=(1, self.buffer_layout.size),
                attrs={"long_name": "the model's running statistics at each checkpoint"},
            )
            s.update_attrs({"buffer_layout": self.buffer_layout.to_attrs()})
        if self._draws_masks:
            s.create_array(
                "step_seed",
                dims=("step",),
                shape=(0,),
                dtype=np.int64,
                chunks=(65536,),
                attrs={
                    "long_name": "the seed of each step's dropout masks",
                    "device": self.device.type,  # masks drawn on another device differ
                },
            )
        s.create_array(
            "batch_index",
            dims=("step", "slot"),
            shape=(0, 1),
            dtype=np.int64,
            chunks=(4096, 64),
            fill_value=-1,
        )
        for name in ("lr", "momentum", "weight_decay", "batch_loss"):
            s.create_array(name, dims=("step",), shape=(0,), dtype=np.float64, chunks=(65536,))
        s.create_array("step_epoch", dims=("step",), shape=(0,), dtype=np.int64, chunks=(65536,))
        for name in ("train_loss", "test_loss", "test_accuracy"):
            s.create_array(name, dims=("epoch",), shape=(0,), dtype=np.float64, chunks=(4096,))
        s.create_array(
            "train_digest",
            dims=("train",),
            shape=(self.n_train,),
            dtype=np.uint64,
            chunks=(min(self.n_train, 2**20),),
            fill_value=0,
            attrs={
                "long_name": "BLAKE2b-64 digest of each training sample's input and target "
                "bytes as first drawn; 0: never drawn"
            },
        )
        if self.partitioned:
            self._create_partition_arrays()
        s.update_attrs(
            {
                "n_train": self.n_train,
                "n_tracked": n_rows,
                "n_params": lay.n_params,
                "mode": self.mode,
                "parameter_layout": lay.to_attrs(),
                "config": dict(config or {}),
                "software": software_versions(),
                "recorded_step": 0,
                "step_gradient": self._step_gradient,
                "loss": self.loss.to_attrs(),
                **dict(attrs or {}),
            }
        )
        if not self.projector.is_identity:
            s.update_attrs({"projection": self.projector.to_attrs()})

    @property
    def _step_gradient(self) -> str:
        """How the steps' gradients are taken (core.gradients.STEP_GRADIENT_METHODS), for
        replay to take them the same way."""
        if self.mode == "trajectory" or self._tracked_slots_only:
            return "batch_backward"
        if self.sketched is None:
            return "per_sample_mean"
        # A model whose hooks failed the sketched path's check takes one plain backward pass.
        return "batch_backward" if self.sketched.hooks_exact is False else "sketched_backward"

    _STEP_BUFFERS = (
        "step_weights",
        "step_weight_dot",
        "step_weight_abs_dot",
        "gradient_fingerprint",
        "gradient_scale",
    )

    def _empty_step_buffers(self) -> dict[str, list]:
        return {name: [] for name in self._STEP_BUFFERS}

    def _create_partition_arrays(self) -> None:
        """What the partitions are recorded from and checked against: the per-step weights (or,
        when the partitions read a gradient log and need no weights, only their components
        along the fingerprint direction) and the gradient fingerprints."""
        s, n_params = self.store, self.layout.n_params
        if self._logs_gradients:
            for name, what in (
                ("step_weight_dot", "<w_{t-1}, u>"),
                ("step_weight_abs_dot", "<|w_{t-1}|, |u|>"),
            ):
                s.create_array(
                    name,
                    dims=("step",),
                    shape=(0,),
                    dtype=np.float64,
                    chunks=(65536,),
                    attrs={"long_name": f"{what}, the weights before each step along u"},
                )
        else:
            s.create_array(
                "step_weights",
                dims=("step", "param"),
                shape=(0, n_params),
                dtype=self._weights_dtype,
                chunks=matrix_chunks(2**40, n_params, self._itemsize),
                attrs={"long_name": "w_{t-1}: the weights each step's gradients were taken at"},
            )
        s.create_array(
            "gradient_fingerprint",
            dims=("step", "slot"),
            shape=(0, 1),
            dtype=np.float64,
            chunks=(4096, 64),
            fill_value=np.nan,
            attrs={"long_name": "<g_i(w_{t-1}), u> of each batch slot (docs/scaling.md)"},
        )
        s.create_array(
            "gradient_scale",
            dims=("step",),
            shape=(0,),
            dtype=np.float64,
            chunks=(65536,),
            attrs={"long_name": "root-mean-square norm of the step's per-sample gradients"},
        )
        plan = self.plan
        s.update_attrs(
            {
                "partitions": {
                    "count": plan.n_partitions,
                    "rows": plan.rows_per_partition,
                    "memory_budget": plan.budget,
                    "workers": plan.workers,
                    "state_bytes_per_row": plan.bytes_per_row,
                    "state_dtype": str(self.state_dtype).removeprefix("torch."),
                    "has_momentum": self.has_momentum,
                    "fingerprint_seed": self._fingerprint_seed,
                    "gradient_log": self._logs_gradients,
                }
            }
        )

    @property
    def _weights_dtype(self):
        return np.float64 if self.dtype == torch.float64 else np.float32

    @property
    def _itemsize(self) -> int:
        return np.dtype(self._weights_dtype).itemsize

    # -- training -----------------------------------------------------------------------------
    def step(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        indices: torch.Tensor | np.ndarray | Sequence[int],
    ) -> float:
        """One SGD step on a batch; returns the batch's mean training loss.

        `indices` are the training-set indices (0..N-1) of the batch's samples.
        """
        if self._finished:
            raise InvalidArgumentError("the recording is finished; create a new recorder")
        index = self._batch_index(indices)
        if index.size != inputs.shape[0] or targets.shape[0] != inputs.shape[0]:
            raise InvalidArgumentError(
                f"inputs, targets and indices must have one entry per sample; got "
                f"{inputs.shape[0]}, {targets.shape[0]} and {index.size}"
            )
        if index.size == 0:
            raise InvalidArgumentError("an empty batch cannot be a training step")
        if index.min() < 0 or index.max() >= self.n_train:
            raise InvalidArgumentError(
                f"batch indices must lie in [0, {self.n_train}); got {index.min()}..{index.max()}"
            )
        values, counts = np.unique(index, return_counts=True)
        if (counts > 1).any():
            raise InvalidArgumentError(
                f"step {self.step_count + 1}: the batch holds training samples "
                f"{values[counts > 1][:5].tolist()} more than once; each sample may be drawn "
                "once a batch"
            )
        if index.size < 2 and self._batch_norm and self.model.training:
            raise InvalidArgumentError(
                f"step {self.step_count + 1}: BatchNorm needs at least 2 samples per batch in "
                "training, this batch has 1; drop the last incomplete batch (for example "
                "DataLoader(..., drop_last=True))"
            )
        if self._named is not None:
            self._named.check_batch(inputs, targets, index, self.step_count + 1)
        if self.step_count == 0:
            self._settle_loss_kind(targets)
        settings = read_sgd_settings(self.optimizer)
        inputs = inputs.to(self.device, self.dtype)
        targets = targets.to(self.device)
        self._note_digests(index, inputs, targets)
        sketched = None
        # `gradients` holds the per-sample gradients of the batch slots `slots` (every slot
        # unless only the tracked ones are taken), `step_gradient` what the step takes.
        slots = np.arange(index.size)
        step_gradient = None
        seed = step_seed(self.seed, self.step_count + 1) if self._draws_masks else None
        with step_randomness(seed, self.device):
            if self.mode == "trajectory":
                losses, gradients = batch_gradient(
                    self.model, self.layout, inputs, targets, self.loss
                )
            elif self._tracked_slots_only:
                slots = np.nonzero(self.selection.row_of[index] >= 0)[0]
                on_device = torch.as_tensor(slots, device=self.device)
                losses, step_gradient, gradients = slot_gradients(
                    self.model, self.layout, inputs, targets, on_device, self.loss
                )
            elif self.sketched is not None:
                direction = self._direction if self.partitioned else None
                checked = self.sketched.hooks_exact is not None
                sketched = self.sketched(inputs, targets, direction)
                losses, gradients = sketched.losses, sketched.mean_gradient[None]
                if not checked and self.sketched.hooks_exact is False:
                    self.store.update_attrs({"step_gradient": self._step_gradient})
            else:
                losses, gradients = self.per_sample(inputs, targets)
        if not torch.isfinite(losses).all():
            raise InvalidArgumentError(
                f"the training loss became {losses.mean().item()} at step {self.step_count + 1}; "
                "lower the learning rate"
            )
        if self.partitioned:
            weights_before = get_flat_parameters(self.model, self.layout)
            if self._logs_gradients:
                u = self._direction.to(weights_before.device)
                flat = weights_before.double()
                self._pending_steps["step_weight_dot"].append(float(flat @ u))
                self._pending_steps["step_weight_abs_dot"].append(float(flat.abs() @ u.abs()))
            else:
                self._pending_steps["step_weights"].append(weights_before.cpu().numpy())
            if sketched is not None:
                fingerprints = sketched.fingerprints.double().cpu().numpy()
                scale = sketched.gradient_scale
            elif step_gradient is not None:
                fingerprints, scale = self._every_slots_fingerprints(
                    inputs, targets, seed, step_gradient, gradients
                )
            else:
                fingerprints = gradient_fingerprints(gradients, self._direction)
                scale = gradient_scale(gradients)
            self._pending_steps["gradient_fingerprint"].append(fingerprints)
            self._pending_steps["gradient_scale"].append(scale)
        if self.exact is not None:
            weights_before = get_flat_parameters(self.model, self.layout)
            with step_randomness(seed, self.device):  # the masks of the step's forward pass
                self.exact.step(
                    weights_before,
                    inputs,
                    targets,
                    index,
                    gradients,
                    settings,
                    batch_index_tracked=index[slots],
                )
        if self.approximate is not None:
            projected = (
                sketched.projected if sketched is not None else self.projector.project(gradients)
            )
            self.approximate.step(index[slots], projected, settings, batch_size=index.size)
        if self._log is not None:
            rows = self.selection.row_of[index[slots]]
            keep = np.nonzero(rows >= 0)[0]
            if keep.size:
                keep_index = torch.as_tensor(keep, device=gradients.device)
                if sketched is not None:
                    projected = sketched.projected[keep_index].detach().cpu().numpy()
                else:
                    tracked = gradients[keep_index]
                    projected = self.projector.project(tracked).detach().cpu().numpy()
                self._log.add(self.step_count + 1, rows[keep], projected)
        sgd_step(
            self.model,
            self.optimizer,
            self.layout,
            gradients if step_gradient is None else step_gradient,
        )
        if seed is not None:
            self._pending_seeds.append(seed)
        if self._batch_labels is not None:
            self._note_labels(index, targets)
        self.step_count += 1
        loss = float(losses.mean())
        self._buffer_step(index, settings, loss)
        buffered = len(self._pending_steps["step_weights"]) * self.layout.n_params * self._itemsize
        if self._log is not None:
            buffered += self._log.buffered_bytes
        if buffered > self.STEP_BUFFER_BYTES:
            self._flush()
        self._epoch_losses.append(loss * index.size)
        self._epoch_samples += index.size
        return loss

    def _every_slots_fingerprints(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        seed: int | None,
        step_gradient: torch.Tensor,
        tracked_rows: torch.Tensor,
    ) -> tuple[np.ndarray, float]:
        """(every slot's fingerprint, the step's gradient scale) of a partitioned step that
        formed only its tracked slots' rows: by one forward-mode pass and the estimated scale
        where the model's operations have forward-mode derivatives; else (an
        `autograd.Function` without a jvp, say: known at the first step) from every slot's
        row, as before the tracked-slots path, exact and a batched backward pass dearer."""
        if self._forward_mode_fingerprints is not False:
            try:
                with step_randomness(seed, self.device):  # the masks of the step's forward pass
                    dots = slot_fingerprints(
                        self.model, self.layout, inputs, targets, self._direction, self.loss
                    )
            except (RuntimeError, NotImplementedError) as error:
                if self._forward_mode_fingerprints or unwrap_interruption(error) is not error:
                    raise
                self._forward_mode_fingerprints = False
            else:
                self._forward_mode_fingerprints = True
                fingerprints = dots.double().cpu().numpy()
                return fingerprints, estimated_gradient_scale(
                    fingerprints, step_gradient, tracked_rows
                )
        with step_randomness(seed, self.device), frozen_running_stats(self.model):
            every = batched_backward_gradients(self.model, self.layout, inputs, targets, self.loss)[
                1
            ]
        return gradient_fingerprints(every, self._direction), gradient_scale(every)

    def _batch_index(self, indices) -> np.ndarray:
        """The batch's training-set indices as int64, refusing what is not a list of integers."""
        step = self.step_count + 1
        if indices is None:
            raise InvalidArgumentError(
                f"step {step}: no indices given; recorder.step(inputs, targets, indices) needs "
                "each sample's index in the training set (wrap the data set in "
                "hydra_store.IndexedDataset to have a DataLoader yield them)"
            )
        raw = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer):
            raise InvalidArgumentError(
                f"step {step}: the batch's indices must be integers (training-set positions), "
                f"got {raw.dtype}"
            )
        return raw.astype(np.int64).reshape(-1)

    def _settle_loss_kind(self, targets: torch.Tensor) -> None:
        """A user's loss is a regression loss when its targets are floating point."""
        regression = targets.is_floating_point()
        if self.loss.spec in BUILT_IN_LOSSES or regression != self.loss.classification:
            return
        self.loss = dataclasses.replace(self.loss, classification=not regression)
        self.store.update_attrs({"loss": self.loss.to_attrs()})

    def _note_digests(self, index: np.ndarray, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Digest the samples drawn for the first time (core/fingerprints.py `sample_digests`)."""
        new = np.nonzero(self._digests[index] == 0)[0]
        if new.size:
            chosen = torch.as_tensor(new, device=inputs.device)
            self._digests[index[new]] = sample_digests(inputs[chosen], targets[chosen])
            self._digests_dirty = True

    def _note_labels(self, index: np.ndarray, targets: torch.Tensor) -> None:
        if not self.loss.classification:
            return
        rows = self.selection.row_of[index]
        keep = rows >= 0
        if keep.any():
            self._batch_labels[rows[keep]] = targets.cpu().numpy()[keep]

    def _buffer_step(self, index: np.ndarray, settings: SGDSettings, loss: float) -> None:
        p = self._pending
        p["batch_index"].append(index)
        p["lr"].append(settings.lr)
        p["momentum"].append(settings.momentum)
        p["weight_decay"].append(settings.weight_decay)
        p["step_epoch"].append(self.epoch)
        p["batch_loss"].append(loss)

    def _flush(self) -> None:
        """Append everything buffered since the last flush, one block per array."""
        p = self._pending
        if p["lr"]:
            width = max(b.size for b in p["batch_index"])
            block = np.full((len(p["batch_index"]), width), -1, dtype=np.int64)
            for k, b in enumerate(p["batch_index"]):
                block[k, : b.size] = b
            self.store.append("batch_index", block)
            for name in ("lr", "momentum", "weight_decay", "batch_loss"):
                self.store.append(name, np.asarray(p[name], dtype=np.float64))
            self.store.append("step_epoch", np.asarray(p["step_epoch"], dtype=np.int64))
        if self._pending_seeds:
            self.store.append("step_seed", np.asarray(self._pending_seeds, dtype=np.int64))
            self._pending_seeds = []
        for name, rows in self._pending_blocks.items():
            if rows:
                self.store.append(name, np.stack([np.asarray(r) for r in rows]))
        buffers = self._pending_steps
        fingerprints = buffers["gradient_fingerprint"]
        if buffers["step_weights"]:
            self.store.append("step_weights", np.stack(buffers["step_weights"]))
        for name in ("step_weight_dot", "step_weight_abs_dot"):
            if buffers[name]:
                self.store.append(name, np.asarray(buffers[name], dtype=np.float64))
        if fingerprints:
            block = np.full((len(fingerprints), max(f.size for f in fingerprints)), np.nan)
            for k, f in enumerate(fingerprints):
                block[k, : f.size] = f
            self.store.append("gradient_fingerprint", block)
            self.store.append(
                "gradient_scale", np.asarray(self._pending_steps["gradient_scale"], np.float64)
            )
        if self._log is not None:
            self._log.flush()
        if self._digests_dirty:
            writable(self.store.group["train_digest"])[:] = self._digests
            self._digests_dirty = False
        self._pending = {k: [] for k in self._STEP_VARIABLES}
        self._pending_blocks = {k: [] for k in self._BLOCK_VARIABLES}
        self._pending_steps = self._empty_step_buffers()
        self.store.update_attrs({"recorded_step": int(self.store.group["lr"].shape[0])})
        consolidate(self.path)
        self._last_flush = time.monotonic()

    _BLOCK_VARIABLES = (
        "weights",
        "velocity",
        "buffers",
        "checkpoint_step",
        "checkpoint_epoch",
        "train_loss",
        "test_loss",
        "test_accuracy",
    )

    def _checkpoint(self, epoch: int) -> None:
        b = self._pending_blocks
        b["weights"].append(
            get_flat_parameters(self.model, self.layout).cpu().numpy().astype(self._weights_dtype)
        )
        b["velocity"].append(
            velocity_of(self.optimizer, self.model, self.layout)
            .cpu()
            .numpy()
            .astype(self._weights_dtype)
        )
        b["checkpoint_step"].append(np.int64(self.step_count))
        b["checkpoint_epoch"].append(np.int64(epoch))
        if self.buffer_layout.size:
            b["buffers"].append(self.buffer_layout.flatten(self.model))
        self._last_checkpoint_step = self.step_count
        if self.hypergradient_history and not self.partitioned:
            for name, tracker in self._trackers():
                self.store.append_rows(
                    f"{name}_history",
                    self.selection.n_rows,
                    tracker.state.width,
                    lambda a, b, tr=tracker: self._to_host.to_host(tr.hypergradient_rows(a, b)),
                    dims=("checkpoint", "sample", self._dim(name)),
                    attrs={"long_name": "dw_t/d eps_i at each checkpoint"},
                )

    def _dim(self, name: str) -> str:
        """The name of the tracked vectors' axis: `param`, or the projection's."""
        return self.projector.dim if name == "hypergradient" else "param"

    def _trackers(self):
        return named_trackers(self.approximate, self.exact)

    def checkpoint(self) -> None:
        """Take a checkpoint of the weights and momentum.

        The trajectory and checkpoints reach the store in blocks: at most every
        `flush_seconds` (each zarr append costs milliseconds, which added up to most of a short
        run's time when done every epoch), and always at the end.
        """
        self._checkpoint(self.epoch)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self._flush()

    def end_epoch(
        self, *, test_loss: float = float("nan"), test_accuracy: float = float("nan")
    ) -> EpochRecord:
        """Close an epoch: log its metrics and take a checkpoint every `checkpoint_every` epochs."""
        train_loss = sum(self._epoch_losses) / max(1, self._epoch_samples)
        self.epoch += 1
        record = EpochRecord(self.epoch, train_loss, float(test_loss), float(test_accuracy))
        self.epochs.append(record)
        self._pending_blocks["train_loss"].append(train_loss)
        self._pending_blocks["test_loss"].append(record.test_loss)
        self._pending_blocks["test_accuracy"].append(record.test_accuracy)
        self._epoch_losses, self._epoch_samples = [], 0
        if self.epoch % self.checkpoint_every == 0:
            self.checkpoint()
        return record

    def hypergradients(self, exact: bool = False) -> torch.Tensor:
        """h_T of all tracked rows as one tensor (for small runs and tests; the store streams)."""
        if self.partitioned:
            raise InvalidArgumentError(
                "this recording's hypergradients are recorded in partitions into the store; "
                "read them from the store"
            )
        tracker = self.exact if exact else self.approximate
        if tracker is None:
            raise InvalidArgumentError(
                f"this recorder does not run the {'exact' if exact else 'approximate'} mode"
            )
        return tracker.hypergradient_rows(0, self.selection.n_rows)

    def finish(
        self,
        progress: Callable[[int, int], None] | None = None,
        *,
        training_data: TrainingData | None = None,
        scheduler: str = "threads",
        partition_progress: Callable[[str, int, int], None] | None = None,
    ) -> StorePath:
        """Write the hypergradients and the last checkpoint, then mark the store complete.

        A partitioned recording (`self.partitioned`) records its partitions here, on
        `scheduler`, from the stored steps: it needs `training_data` (the model and the whole
        training set as the batches index it), which a built-in run's store can rebuild.
        """
        if self._finished:
            return self.path
        built_in = {"dataset", "model"} <= set(self.store.group.attrs.get("config") or {})
        if self.partitioned and training_data is None and not built_in:
            raise InvalidArgumentError(
                "this recording's state is larger than its memory budget, so its hypergradients "
                "are recorded in partitions after training from the training data: call "
                "finish(training_data=TrainingData(model, inputs, targets))"
            )
        if self._last_checkpoint_step != self.step_count:
            self._checkpoint(self.epoch)
        self._flush()
        if self._batch_labels is not None:
            writable(self.store.group["label"])[:] = self._batch_labels
        if self.partitioned:
            if training_data is not None and training_data.loss is None:
                training_data = dataclasses.replace(training_data, loss=self.loss)
            self._record_partitions(training_data, scheduler, partition_progress)
        for name, tracker in self._trackers():
            self.store.write_rows(
                name,
                self.selection.n_rows,
                tracker.state.width,
                # Nothing changes the rows after the final write reads them: no snapshot.
                lambda a, b, tr=tracker: self._to_host.to_host(
                    tr.hypergradient_rows(a, b), snapshot=False
                ),
                dims=("sample", self._dim(name)),
                attrs={"step": self.step_count, "long_name": "dw_T/d eps_i"},
                progress=progress,
            )
        self.store.close()
        self.store.set_status(STATUS_COMPLETE, recorded_step=self.step_count, completed=now_iso())
        self._finished = True
        return self.path

    def _record_partitions(
        self,
        training_data: TrainingData | None,
        scheduler: str,
        progress: Callable[[str, int, int], None] | None,
    ) -> None:
        """Create the hypergradient arrays (chunks aligned to the partitions), then record the
        partitions into them."""
        n_rows, rows = self.selection.n_rows, self.plan.rows_per_partition
        n_checkpoints = int(self.store.group["checkpoint_step"].shape[0])
        for name in tracked_variables(self.mode):
            width = self._width(name)
            chunk_rows = min(rows, matrix_chunks(n_rows, width)[0])
            self.store.create_array(
                name,
                dims=("sample", self._dim(name)),
                shape=(n_rows, width),
                dtype=np.float32,
                chunks=(chunk_rows, width),
                attrs={"step": self.step_count, "long_name": "dw_T/d eps_i"},
            )
            if self.hypergradient_history:
                self.store.create_array(
                    f"{name}_history",
                    dims=("checkpoint", "sample", self._dim(name)),
                    shape=(n_checkpoints, n_rows, width),
                    dtype=np.float32,
                    chunks=(1, chunk_rows, width),
                    attrs={"long_name": "dw_t/d eps_i at each checkpoint"},
                )
        self.store.create_array(
            "partition_done",
            np.zeros(self.plan.n_partitions, dtype=bool),
            dims=("partition",),
            chunks=(1,),
        )
        self.store.update_attrs({"hypergradient_history_recorded": self.hypergradient_history})
        consolidate(self.path)
        self.store.close()
        run_partitions(
            self.path,
            training_data,
            scheduler=scheduler,
            workers=self.plan.workers,
            progress=progress,
        )

    def fail(self, reason: str) -> None:
        """Mark the store as failed (it keeps what was written, and says it is incomplete)."""
        if self._finished:
            return
        self._finished = True
        # Keep what can be kept: the buffered steps, then whatever is still being written. Either
        # may fail too (a full disk); the status must be written all the same.
        with contextlib.suppress(Exception):
            self._flush()
        with contextlib.suppress(Exception):
            self.store.close()
        steps = self.store.group["lr"].shape[0] if "lr" in self.store.group else 0
        self.store.set_status(STATUS_FAILED, failure=reason, recorded_step=int(steps))

    def __enter__(self) -> HydraRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.finish()
            except BaseException as error:
                self._fail_with(type(error), error)
                raise
        else:
            self._fail_with(exc_type, exc)

    def _fail_with(self, exc_type: type[BaseException], exc: BaseException | None) -> None:
        if exc is not None:
            exc = unwrap_interruption(exc)
            exc_type = type(exc)
        if exc_type is KeyboardInterrupt:
            self.fail("interrupted (Ctrl-C)")
        else:
            self.fail(f"{exc_type.__name__}: {exc}" if str(exc) else exc_type.__name__)
