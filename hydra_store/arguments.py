"""The arguments of every stage, one frozen dataclass each: `RecordConfig` (record),
`AnalyzeConfig` (analysis of the stored hypergradients), `ReverseConfig` (reverse mode),
`CompareConfig` (compare), `ValidateConfig` (validate), the baselines beside HyDRA:
`InfluenceConfig`, `TracInConfig`, `TrakConfig`, `CleanConfig` (clean: the paper's Table 3), and
`ClusteringConfig` (the per-method clustering table: the paper's Table 4).

Each is validated before anything is written (`validate()` raises InvalidArgumentError naming the
option and what would be valid) and saved beside its outputs as a `config` attribute, so a result
says how it was made and a stage that reuses another's output can check it. The CLI builds these
and takes its defaults from them. This module imports no torch, zarr or dask.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hydra_store.errors import InvalidArgumentError

DEVICES = ("cpu", "cuda")
# What a recording tracks: the paper's Algorithm 1, the Hessian-aware recurrence, both, or only
# the trajectory (for reverse mode).
MODES = ("approximate", "exact", "both", "trajectory")
SELECTIONS = ("random", "influential", "mixed")
# Features for finding mislabelled samples by clustering (analysis/clustering.py); the first is
# the default (docs/analysis.md, "Finding mislabelled samples"), "paper-signs" the paper's.
CLUSTER_FEATURES = ("total", "paper-signs", "median-signs", "class-means")


SCHEDULES = ("constant", "step", "exponential", "plateau", "cosine")


@dataclass(frozen=True)
class ScheduleSpec:
    """`step`: multiply by `decay` every `step_epochs` epochs (paper, MNIST: 0.1 at epoch 5).
    `exponential`: multiply by `decay` every epoch. `plateau`: multiply by `decay` when the
    monitored loss has not improved by more than 0.01% of its best value for `patience` epochs
    (paper, Fashion-MNIST: 0.5, 2 epochs). `cosine`: cosine annealing to 0, stepped every step.
    """

    name: str = "step"
    decay: float | None = None
    step_epochs: int = 5
    patience: int = 2

    def resolved_decay(self) -> float:
        if self.decay is not None:
            return self.decay
        return {"step": 0.1, "exponential": 0.95, "plateau": 0.5}.get(self.name, 1.0)

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise InvalidArgumentError(
                f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}"
            )
        decay = self.resolved_decay()
        if not 0 < decay <= 1:
            raise InvalidArgumentError(f"--lr-decay must be in (0, 1], got {decay}")
        if self.step_epochs < 1:
            raise InvalidArgumentError(f"--lr-step-epochs must be >= 1, got {self.step_epochs}")
        if self.patience < 0:
            raise InvalidArgumentError(f"--plateau-patience must be >= 0, got {self.patience}")


@dataclass(frozen=True)
class RecordConfig:
    """Defaults follow the paper's supplement (MNIST row of its Table 3): 20 epochs, batch 64,
    lr 0.01 multiplied by 0.1 at epoch 5, weight decay 2e-5, momentum 0.9."""

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-5
    schedule: str = "step"
    lr_decay: float | None = None
    lr_step_epochs: int = 5
    plateau_patience: int = 2
    seed: int = 0
    track: str = "all"
    label_noise: float = 0.0
    checkpoint_every: int = 1
    hypergradient_history: bool = False
    out: str = "hydra-run.zarr"
    overwrite: bool = False
    device: str = "cpu"
    mode: str = "approximate"
    data_root: str | None = None
    validation_fraction: float = 0.0
    memory_budget: str | None = None  # e.g. "4GiB"; None: 80% of the memory available
    # GPU memory the tracked state may take (--device cuda); None: 70% of the GPU's free memory.
    device_memory_budget: str | None = None
    project_dim: int | None = None
    scheduler: str = "threads"  # where partitions run when the state exceeds the budget
    workers: int = 1
    # Seconds of training between durable points (`record --resume` continues from the last):
    # 0 after every step, inf never (recording/durable.py, DurableSchedule).
    durable_seconds: float = 120.0

    def schedule_spec(self) -> ScheduleSpec:
        return ScheduleSpec(
            name=self.schedule,
            decay=self.lr_decay,
            step_epochs=self.lr_step_epochs,
            patience=self.plateau_patience,
        )

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first bad option and what would be valid."""

        def bad(option: str, why: str) -> None:
            raise InvalidArgumentError(f"--{option}: {why}")

        if not 1 <= self.epochs <= 100_000:
            bad("epochs", f"must be between 1 and 100000, got {self.epochs}")
        if not 1 <= self.batch_size <= 1_000_000:
            bad("batch-size", f"must be between 1 and 1000000, got {self.batch_size}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            bad("lr", f"must be in (0, 10], got {self.lr}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            bad("weight-decay", f"must be in [0, 1), got {self.weight_decay}")
        if self.lr * self.weight_decay >= 1:
            bad("weight-decay", "lr x weight decay must be below 1 (the paper's condition 5)")
        if not 0 <= self.label_noise < 1:
            bad("label-noise", f"must be a fraction in [0, 1), got {self.label_noise}")
        if self.checkpoint_every < 1:
            bad("checkpoint-every", f"must be >= 1 epoch, got {self.checkpoint_every}")
        if self.device not in DEVICES:
            bad("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 <= self.validation_fraction < 0.5:
            bad("validation-fraction", f"must be in [0, 0.5), got {self.validation_fraction}")
        if self.hypergradient_history and self.mode == "trajectory":
            bad("hypergradient-history", "a trajectory-only recording has no hypergradients")
        if self.seed < 0:
            bad("seed", f"must be >= 0, got {self.seed}")
        self.schedule_spec().validate()
        track = self.track
        if track != "all" and not track.isdigit() and not Path(track).is_file():
            bad("track", f"must be 'all', a count, or an existing index file; got {track!r}")
        if track.isdigit() and int(track) < 1:
            bad("track", "must track at least one sample")
        for option, size in (
            ("memory-budget", self.memory_budget),
            ("device-memory-budget", self.device_memory_budget),
        ):
            if size is not None:
                check_size(option, size)
        if self.device_memory_budget is not None and self.device != "cuda":
            bad(
                "device-memory-budget",
                "is the GPU memory the tracked state may take; give it with --device cuda",
            )
        if self.project_dim is not None:
            if self.project_dim < 1:
                bad("project-dim", f"must be at least 1, got {self.project_dim}")
            if self.mode != "approximate":
                bad(
                    "project-dim",
                    "projects the approximate recurrence only (the exact one needs every "
                    "parameter); use --mode approximate",
                )
        if self.workers < 1:
            bad("workers", f"must be at least 1, got {self.workers}")
        if not self.durable_seconds >= 0:
            bad("durable-seconds", f"must be >= 0 (inf: never), got {self.durable_seconds}")

    def to_attrs(self) -> dict[str, Any]:
        attrs = dataclasses.asdict(self)
        if self.data_root is not None:
            attrs["data_root"] = str(Path(self.data_root).resolve())
        attrs["out"] = str(Path(self.out).resolve())
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> RecordConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in names})


def check_size(option: str, text: str) -> int:
    """A size such as 4GiB or 500MB in bytes (dask's parser), or InvalidArgumentError naming
    `--option`."""
    from dask.utils import parse_bytes

    try:
        size = int(parse_bytes(text))
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgumentError(
            f"--{option}: {text!r} is not a size; write e.g. 4GiB or 500MB"
        ) from None
    if size <= 0:
        raise InvalidArgumentError(f"--{option}: must be a positive size, got {text!r}")
    return size


def validate_device(device: str | None) -> None:
    """An analyser's `device`: None (the CPU), or one of DEVICES; "cuda" only where torch sees
    a GPU (RecordConfig's wording). torch is imported only when a GPU is asked for."""
    if device is None:
        return
    if device not in DEVICES:
        raise InvalidArgumentError(f"--device: must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
            )


def _at_least(config: object, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            option = name.replace("_", "-")
            raise InvalidArgumentError(f"--{option} must be at least {minimum}, got {value}")


@dataclass(frozen=True)
class AnalyzeConfig:
    """Arguments of one `analyze` run (stored hypergradients); saved as the `config` attribute
    of `analysis/<test set>`."""

    test_set: str = "test"
    checkpoint: int = -1
    top_k: int = 10
    clusters_k: int = 1000
    seed: int = 0
    scheduler: str = "threads"
    memory_limit: str | None = None
    n_workers: int | None = None
    batch_size: int = 256
    figures: bool = True
    grid_tests: int = 4  # test samples shown in the influencer grid
    device: str | None = None  # where the test gradients are taken; None: the CPU
    cluster_features: str = CLUSTER_FEATURES[0]  # what `suspect` is clustered on

    def validate(self) -> None:
        _at_least(self, ("top_k", "clusters_k", "batch_size", "grid_tests", "n_workers"))
        validate_device(self.device)
        _check_cluster_features(self.cluster_features)


def _check_cluster_features(features: str) -> None:
    if features not in CLUSTER_FEATURES:
        raise InvalidArgumentError(
            f"--cluster-features must be one of {', '.join(CLUSTER_FEATURES)}, got {features!r}"
        )


@dataclass(frozen=True)
class ClusteringConfig:
    """Arguments of one per-method clustering table (`suspects --all-methods`, the paper's
    Table 4 for every method with per-test contributions); saved as the `config` attribute of
    `clustering/<test set>`. Both `features` and the paper's signs are scored."""

    test_set: str = "test"
    features: str = CLUSTER_FEATURES[0]
    clusters_k: int = 1000
    seed: int = 0

    def validate(self) -> None:
        _at_least(self, ("clusters_k",))
        _check_cluster_features(self.features)


@dataclass(frozen=True)
class ReverseConfig:
    """Arguments of one reverse-mode run (`analyze --method hydra-exact`); saved as the `config`
    attribute of `reverse/<test set>`.

    `per_test`: None, a count (the first K test samples) or a tuple of test indices given their
    own sweep. `checkpoint`: None for the last, else the checkpoint the trajectory is truncated at.
    `device`: where the sweep runs, "cpu" or "cuda"; None: the CPU.
    """

    test_set: str = "test"
    per_test: int | tuple[int, ...] | None = None
    checkpoint: int | None = None
    scheduler: str = "threads"
    device: str | None = None

    def validate(self) -> None:
        if isinstance(self.per_test, int) and self.per_test < 1:
            raise InvalidArgumentError(f"--per-test must be at least 1, got {self.per_test}")
        validate_device(self.device)


@dataclass(frozen=True)
class CompareConfig:
    """Arguments of one `compare` run; saved as the `config` attribute of
    `reverse/<test set>/comparison`. `checkpoint_methods`: the methods scored over
    checkpoints beside HyDRA's approximation (names of methods that give C(i) at any
    checkpoint: influence, tracin, trak); None: every such method, () none. `device`: where the
    reverse sweeps run (the one over checkpoints, and the exact C(i) when `reverse/<test set>`
    is not stored yet) and the checkpoint methods run (each with the arguments it last ran with,
    on this device whatever device it ran on then); None: the CPU."""

    test_set: str = "test"
    over_checkpoints: bool = True
    every: int = 1
    png: str | None = None
    checkpoint_methods: tuple[str, ...] | None = None
    device: str | None = None

    def validate(self) -> None:
        _at_least(self, ("every",))
        validate_device(self.device)
        names = self.checkpoint_methods
        if names is not None and (
            not isinstance(names, tuple) or not all(isinstance(m, str) and m for m in names)
        ):
            raise InvalidArgumentError(f"--checkpoint-methods must name methods, got {names!r}")


@dataclass(frozen=True)
class ValidateConfig:
    """Arguments of one `validate` run (leave-one-out retraining); saved as the `config`
    attribute of `reverse/<test set>/validation`. `device`: where the retrainings (and the
    reverse sweep, when its results are not stored yet) run; None: the CPU."""

    test_set: str = "test"
    samples: int = 50
    selection: str = "random"
    seed: int = 0
    scheduler: str = "threads"
    device: str | None = None

    def validate(self) -> None:
        _at_least(self, ("samples",))
        validate_device(self.device)
        if self.selection not in SELECTIONS:
            raise InvalidArgumentError(
                f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )


@dataclass(frozen=True)
class LdsConfig:
    """Arguments of one linear-datamodeling-score run (`validate --lds`); saved as the `config`
    attribute of `reverse/<test set>/lds`. `subsets` random subsets of round(`fraction` x N)
    training samples each, drawn with `seed`, are retrained on through the stored trajectory
    (docs/analysis.md, "Linear datamodeling score (LDS)"). `device`: where the retrainings run;
    None: the CPU."""

    test_set: str = "test"
    subsets: int = 32
    fraction: float = 0.5
    seed: int = 0
    scheduler: str = "threads"
    device: str | None = None

    def validate(self) -> None:
        if not 3 <= self.subsets <= 10_000:
            raise InvalidArgumentError(
                "--lds-subsets must be between 3 (a rank correlation over subsets) and 10000 "
                f"(one retraining each), got {self.subsets}"
            )
        if not (math.isfinite(self.fraction) and 0 < self.fraction < 1):
            raise InvalidArgumentError(
                f"--lds-fraction must lie strictly between 0 and 1, got {self.fraction}"
            )
        _at_least(self, ("seed",), minimum=0)
        validate_device(self.device)


INFLUENCE_SOLVERS = ("explicit", "cg", "lissa")


def _validate_baseline(config: Any) -> None:
    """What the baselines' arguments share with ReverseConfig: `checkpoint`, None for the last
    (negative counts from the end), else the stored checkpoint whose weights the method works at
    (TracIn: the last checkpoint of its sum); `per_test`, None, a count (the first K test
    samples) or a tuple of test indices given their own C(i, j). Both are checked against the
    store when it is read; here only their types and a count below 1. `device`: where the
    model is built and every gradient, Hessian product and solve runs, "cpu" or "cuda" (None:
    the CPU; `validate_device`); saved with the config, but where it ran is not what it
    computed, so `compare` reuses a stored config on its own device."""
    validate_device(config.device)
    per_test = config.per_test
    if isinstance(per_test, bool) or not (per_test is None or isinstance(per_test, (int, tuple))):
        raise InvalidArgumentError(
            f"--per-test must be a count or a tuple of test indices, got {per_test!r}"
        )
    if isinstance(per_test, int) and per_test < 1:
        raise InvalidArgumentError(f"--per-test must be at least 1, got {per_test}")
    checkpoint = config.checkpoint
    if checkpoint is not None and (isinstance(checkpoint, bool) or not isinstance(checkpoint, int)):
        raise InvalidArgumentError(f"--checkpoint must be an integer, got {checkpoint!r}")


def _finite_at_least(option: str, value: float | None, minimum: float, strict: bool) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        relation = ">" if strict else ">="
        raise InvalidArgumentError(
            f"--{option} must be a number {relation} {minimum:g}, got {value}"
        )


@dataclass(frozen=True)
class InfluenceConfig:
    """Arguments of one influence-function run at the final weights (`analyze --method
    influence`, Koh & Liang); saved as the `config` attribute of `influence/<test set>`.

    The Hessian is that of the mean training loss plus the last step's weight decay, plus
    `damping` times I; None (the default): 3 x the magnitude of its most negative eigenvalue, 0
    when it has none (docs/analysis.md, "Baselines", for how that was chosen).
    `solver`: explicit (dense Hessian, eigen-decomposition), cg (conjugate gradients, stopping
    at `cg_tolerance` relative residual or `cg_max_iterations`), or lissa (`lissa_repeats`
    recursions of `lissa_depth` steps on minibatches of `lissa_batch_size` samples drawn with
    `seed`, divided by `lissa_scale`; None: 1.5 x the largest eigenvalue, by power iteration).
    `batch_size`: samples per Hessian-vector or gradient batch. `checkpoint`, `per_test` and
    `device`: as in ReverseConfig (`_validate_baseline`)."""

    test_set: str = "test"
    checkpoint: int | None = None
    per_test: int | tuple[int, ...] | None = None
    solver: str = "explicit"
    damping: float | None = None
    cg_tolerance: float = 1e-6
    cg_max_iterations: int = 1000
    lissa_scale: float | None = None
    lissa_depth: int = 1000
    lissa_repeats: int = 4
    lissa_batch_size: int = 128
    seed: int = 0
    batch_size: int = 1024
    device: str | None = None

    def validate(self) -> None:
        _validate_baseline(self)
        if self.solver not in INFLUENCE_SOLVERS:
            raise InvalidArgumentError(
                f"--solver must be one of {', '.join(INFLUENCE_SOLVERS)}, got {self.solver!r}"
            )
        _finite_at_least("damping", self.damping, 0.0, strict=False)
        _finite_at_least("lissa-scale", self.lissa_scale, 0.0, strict=True)
        if not 0 < self.cg_tolerance < 1:
            raise InvalidArgumentError(
                f"--cg-tolerance must lie in (0, 1), got {self.cg_tolerance}"
            )
        _at_least(
            self,
            ("cg_max_iterations", "lissa_depth", "lissa_repeats", "lissa_batch_size", "batch_size"),
        )
        _at_least(self, ("seed",), minimum=0)


@dataclass(frozen=True)
class TracInConfig:
    """Arguments of one TracIn run over the stored checkpoints (`analyze --method tracin`);
    saved as the `config` attribute of `tracin/<test set>`. `batch_size`: samples per
    gradient batch. `checkpoint`: the sum runs over checkpoints 1..checkpoint; `per_test` and
    `device`: as in ReverseConfig (`_validate_baseline`)."""

    test_set: str = "test"
    checkpoint: int | None = None
    per_test: int | tuple[int, ...] | None = None
    batch_size: int = 1024
    device: str | None = None

    def validate(self) -> None:
        _validate_baseline(self)
        _at_least(self, ("batch_size",))


@dataclass(frozen=True)
class TrakConfig:
    """Arguments of one TRAK-style run at the final weights (`analyze --method trak`); saved
    as the `config` attribute of `trak/<test set>`. `project_dim`: the width K of the tensor
    sketch the per-sample gradients are projected to (None, or not below the parameter count:
    no projection), drawn with `seed`; `damping` is added to the projected Gram matrix divided
    by N. `checkpoint`, `per_test` and `device`: as in ReverseConfig (`_validate_baseline`)."""

    test_set: str = "test"
    checkpoint: int | None = None
    per_test: int | tuple[int, ...] | None = None
    project_dim: int | None = 1024
    damping: float = 0.01
    seed: int = 0
    batch_size: int = 256
    device: str | None = None

    def validate(self) -> None:
        _validate_baseline(self)
        _at_least(self, ("project_dim", "batch_size"))
        _at_least(self, ("seed",), minimum=0)
        _finite_at_least("damping", self.damping, 0.0, strict=True)


@dataclass(frozen=True)
class CleanConfig:
    """Arguments of one `clean` run (the paper's Table 3): rank the training samples by each
    method's C(i) on `test_set`, drop the round(`rate` x N) with the lowest C(i), retrain from
    scratch on the rest with the store's recipe, once per seed 0..`seeds`-1, and report the
    final accuracy on `evaluate_on`; saved as the `config` attribute of
    `cleaning/<test set>`.

    `test_set`: the set whose contributions rank the samples; None: `validation` when the store
    has a validation split, else `test` (ranking and scoring on one set leaks its labels into
    the choice; the summary says so). The saved config names the set used.
    `rate`: None: the store's injected label-noise rate. `rankings`: method names
    (`hydra-exact`, `hydra`, `influence`, `tracin`, `trak`, or `none`, `random`, `oracle`);
    None: every stored ranking plus the three references. `seed`: draws the random drop.
    `device`: None: the store's. `png`: the bar chart's path; None: beside the results store.
    `within_class`: drop the lowest C(i) within each training class (labels as trained on),
    the same total round(`rate` x N) shared among the classes by largest remainder, and the
    random drop as many per class; no filtering and the oracle unchanged."""

    test_set: str | None = None
    evaluate_on: str = "test"
    rate: float | None = None
    seeds: int = 5
    rankings: tuple[str, ...] | None = None
    seed: int = 0
    scheduler: str = "threads"
    workers: int | None = None
    device: str | None = None
    png: str | None = None
    within_class: bool = False

    def validate(self) -> None:
        if self.rate is not None and not (math.isfinite(self.rate) and 0 <= self.rate < 1):
            raise InvalidArgumentError(
                f"--rate must be a fraction in [0, 1) of the training set to drop, got {self.rate}"
            )
        if not 1 <= self.seeds <= 1000:
            raise InvalidArgumentError(
                f"--seeds must be between 1 and 1000 (retrainings per method), got {self.seeds}"
            )
        _at_least(self, ("seed",), minimum=0)
        _at_least(self, ("workers",))
        if self.device is not None and self.device not in DEVICES:
            raise InvalidArgumentError(
                f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}"
            )
        for name, value in (("test-set", self.test_set), ("evaluate-on", self.evaluate_on)):
            if value is not None and not str(value).strip():
                raise InvalidArgumentError(f"--{name} must name a test set, got an empty string")
        if self.rankings is not None:
            if not self.rankings:
                raise InvalidArgumentError("--method: name at least one ranking")
            repeated = sorted({r for r in self.rankings if self.rankings.count(r) > 1})
            if repeated:
                raise InvalidArgumentError(f"--method {repeated[0]} is given twice")
            if self.within_class and set(self.rankings) <= {"none", "oracle"}:
                raise InvalidArgumentError(
                    "--within-class changes only the rankings that drop the lowest C(i) and "
                    "random, and --method names only none/oracle; add a method or random, or "
                    "leave out --within-class"
                )


C = TypeVar("C")


def resolve_config(kind: type[C], config: C | str, options: dict[str, Any]) -> C:
    """A stage's arguments given either as its dataclass, or as a test-set name plus keyword
    options (the keyword form of the Python API)."""
    if isinstance(config, kind):
        if options:
            raise InvalidArgumentError(
                f"pass either a {kind.__name__} or keyword options, not both "
                f"(got {', '.join(sorted(options))})"
            )
        return config
    if not isinstance(config, str):
        raise InvalidArgumentError(
            f"expected a {kind.__name__} or a test-set name, got {type(config).__name__}"
        )
    return kind(test_set=config, **options)
