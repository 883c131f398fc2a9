"""Cleaning a noisy training set, the paper's Table 3: rank the training samples by a method's
contributions C(i), drop the least useful share r, retrain from scratch on the rest, and
measure the final accuracy.

For a rate r and N training samples every ranking drops exactly round(r N) samples (Python's
rounding): those with the lowest C(i) (C(i) < 0: removing i would lower the test loss, i.e. i
hurts; ties go to the lower training index). Beside the stored methods' rankings
(`MethodRegistry.totals`) three references: `no filtering` (drop nothing), `random` (round(r N)
samples drawn without replacement from the config's seed, one draw for every training seed)
and `oracle` (drop exactly the mislabelled samples, the store's `is_noisy`).

One global ranking compares C(i) across classes whose magnitudes differ and can drop a whole
class's correctly labelled samples. `within_class` ranks each observed training class (the
labels trained on, noisy ones included) on its own instead: class c loses its count_c lowest
C(i), the counts allocated by largest remainder so that they add up to the same round(r N)
(`class_drop_counts`); `random` then draws the same count_c within each class, and the
oracle and no filtering are unchanged.

Each ranking's kept samples are trained on from scratch with the recipe the store's `config`
holds (the model spec, epochs, batch size, learning rate and its schedule, momentum, weight
decay: `hydra-store record`'s), once per seed 0..S-1; seed s sets the model's initial weights
(`build_model(seed=s)`) and the batch order (a permutation of the kept samples per epoch from a
generator seeded with s), the same seeds for every ranking, so the comparisons are paired. With
every sample kept and s the recorded run's seed this is the recorded run itself (tested). The
batches shrink with the kept set (ceil(n_kept / B) steps per epoch): this is retraining on the
rest, not `validate`'s replay of the stored steps with some losses weighted 0. Each (ranking,
seed) is one task on the task fan-out; the result is the accuracy (argmax of the logits
against the labels) on the evaluation set after the last epoch, as the paper reports it.

Ranking by the contributions to the set the accuracy is measured on would let that set's labels
choose the training data (a leak): the ranking set defaults to the store's validation split when
it has one (`record --validation-fraction`) and the accuracy is taken on the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.analysis.methods import MethodRegistry, default_methods
from hydra_store.analysis.reverse import flush_denormals
from hydra_store.analysis.test_sets import TestSet, group_name, resolve_test_set
from hydra_store.arguments import CleanConfig, RecordConfig, ScheduleSpec, resolve_config
from hydra_store.core.gradients import batch_gradient, evaluate
from hydra_store.core.losses import CROSS_ENTROPY, PerSampleLoss, recorded_loss
from hydra_store.core.lr_schedules import EpochSchedule
from hydra_store.core.model_state import has_dropout, step_randomness, step_seed
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.sgd import sgd_step
from hydra_store.data.datasets import Split
from hydra_store.data.models import build_model
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.execution import map_tasks
from hydra_store.replay.recorded_run import RunData, RunInputs, load_run_data, recorded_config
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]
ArraySpec = tuple[np.ndarray, tuple[str, ...], dict[str, Any]]

CLEAN_GROUP = "cleaning"
NO_FILTERING, RANDOM, ORACLE = "no filtering", "random", "oracle"
# The reference rankings by the name `--method` takes.
REFERENCES = {"none": NO_FILTERING, "random": RANDOM, "oracle": ORACLE}
# The root `config` keys the retraining recipe is read from; a store recorded around a user's
# own training loop does not hold them.
RECIPE_KEYS = ("model", "epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule")

# Final test accuracy (%) in the paper: its Table 3 (80% of the labels wrong) and its
# supplement's Table 4 (50%); LeNet-5 on MNIST and Fashion-MNIST, DenseNet-40 on CIFAR-10,
# 20 epochs, the accuracy of the last one.
PAPER_TABLE3: dict[str, dict[float, dict[str, float]]] = {
    "MNIST, LeNet-5": {
        0.8: {"no filtering": 72.93, "influence functions": 90.07, "HyDRA": 98.31},
        0.5: {"no filtering": 94.65, "influence functions": 93.83, "HyDRA": 98.31},
    },
    "Fashion-MNIST, LeNet-5": {
        0.8: {"no filtering": 78.52, "influence functions": 63.20, "HyDRA": 86.72},
        0.5: {"no filtering": 87.44, "influence functions": 76.70, "HyDRA": 87.28},
    },
    "CIFAR-10, DenseNet-40": {
        0.8: {"no filtering": 31.36, "influence functions": 42.12, "HyDRA": 72.01},
        0.5: {"no filtering": 68.91, "influence functions": 58.34, "HyDRA": 75.06},
    },
}


# -- what is dropped ----------------------------------------------------------------------------


def drop_count(rate: float, n_train: int) -> int:
    """round(rate x N) (Python's rounding), refused when it would drop every sample."""
    count = round(rate * n_train)
    if count >= n_train:
        raise InvalidArgumentError(
            f"--rate {rate}: dropping round({rate} x {n_train}) = {count} samples leaves none to "
            "train on; choose a smaller rate"
        )
    return count


def drop_lowest(index: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """The training indices (sorted) of the `count` samples with the lowest C(i): the least
    useful. `index` (n,) names the training sample of each of `values` (n,); ties go to the
    lower training index."""
    index = np.asarray(index, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if index.shape != values.shape or index.ndim != 1:
        raise InvalidArgumentError(
            f"a ranking needs one C(i) per training index, got {index.shape} and {values.shape}"
        )
    if not 0 <= count <= index.size:
        raise InvalidArgumentError(f"cannot drop {count} of {index.size} ranked samples")
    by_index = np.argsort(index, kind="stable")
    order = by_index[np.argsort(values[by_index], kind="stable")]
    return np.sort(index[order[:count]])


def random_drop(n_train: int, count: int, seed: int) -> np.ndarray:
    """`count` training indices (sorted) drawn without replacement, reproducibly from `seed`."""
    rng = np.random.default_rng([seed, 0xC1EA])
    return np.sort(rng.choice(n_train, size=count, replace=False)).astype(np.int64)


def class_drop_counts(rate: float, labels: np.ndarray) -> dict[int, int]:
    """How many samples a drop within each class takes from each observed class c of `labels`
    (N,), in class order: floor(r n_c), plus one for the classes with the largest remainders
    r n_c - floor(r n_c) (ties to the lower class) until the counts add up to `drop_count(r, N)`,
    the global drop's total. Each count is within 1 of r n_c and at most n_c. r n_c is
    computed exactly, r being the decimal the rate is written as (0.7 x 10 is 7, not
    6.99...)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgumentError(
            f"a drop within classes needs one integer label per training sample, got "
            f"{labels.dtype} of shape {labels.shape}"
        )
    total = drop_count(rate, labels.size)
    exact = Fraction(repr(float(rate)))
    classes, sizes = np.unique(labels, return_counts=True)
    shares = [exact * int(n) for n in sizes]
    counts = [math.floor(share) for share in shares]
    extra = total - sum(counts)  # round(the sum of the remainders): 0..classes
    if not 0 <= extra <= classes.size:
        raise AnalysisError(
            f"cannot share {total} dropped samples among classes of sizes {sizes.tolist()}"
        )
    by_remainder = sorted(range(classes.size), key=lambda k: (counts[k] - shares[k], k))
    for k in by_remainder[:extra]:
        counts[k] += 1
    return {int(c): int(n) for c, n in zip(classes, counts, strict=True)}


def _class_members(labels: np.ndarray, counts: dict[int, int]) -> list[tuple[np.ndarray, int]]:
    labels = np.asarray(labels)
    observed = {int(c) for c in np.unique(labels)}
    if observed != set(counts):
        raise InvalidArgumentError(
            f"per-class drop counts name the classes {sorted(counts)}, the labels hold "
            f"{sorted(observed)}"
        )
    return [(labels == c, count) for c, count in sorted(counts.items())]


def drop_lowest_within_class(
    index: np.ndarray, values: np.ndarray, labels: np.ndarray, counts: dict[int, int]
) -> np.ndarray:
    """The training indices (sorted) of the `counts[c]` samples with the lowest C(i) within
    each class c: `drop_lowest` on each class's samples alone. `labels` (N,) is every training
    sample's label (by training index); `index`/`values` as for `drop_lowest`."""
    index = np.asarray(index, dtype=np.int64)
    labels = np.asarray(labels)
    if index.size and (index.min() < 0 or index.max() >= labels.size):
        raise InvalidArgumentError(
            f"training indices must lie in [0, {labels.size}), the labels' length"
        )
    values = np.asarray(values, dtype=np.float64)
    if index.shape != values.shape or index.ndim != 1:
        raise InvalidArgumentError(
            f"a ranking needs one C(i) per training index, got {index.shape} and {values.shape}"
        )
    parts = [np.zeros(0, dtype=np.int64)]
    for inside, count in _class_members(labels, counts):
        mine = inside[index]
        parts.append(drop_lowest(index[mine], values[mine], count))
    return np.sort(np.concatenate(parts))


def random_drop_within_class(labels: np.ndarray, counts: dict[int, int], seed: int) -> np.ndarray:
    """`counts[c]` training indices of each class c of `labels` (N,) drawn without replacement,
    reproducibly from `seed` (sorted): the random reference for a drop within classes."""
    rng = np.random.default_rng([seed, 0xC1EA, 1])
    parts = [
        rng.choice(np.flatnonzero(inside), size=count, replace=False)
        for inside, count in _class_members(labels, counts)
    ]
    return np.sort(np.concatenate([np.zeros(0, dtype=np.int64), *parts])).astype(np.int64)


def mislabelled(path: Path, data: RunData, inputs: RunInputs | None) -> np.ndarray | None:
    """(N,) bool: the samples whose training label was changed by the injected noise; None
    when the store injected none.

    Read from the root's `is_noisy` (over the tracked samples, `sample`); when not every sample
    was tracked, a built-in run's clean labels are rebuilt from its config (the data set before
    the noise), checked against `is_noisy` where it exists."""
    root = open_group(path)
    if "is_noisy" not in root:
        return None
    n_train = len(data.train)
    sample = np.asarray(root["sample"][:], dtype=np.int64)
    stored = np.asarray(root["is_noisy"][:], dtype=bool)
    if sample.size == n_train and np.array_equal(np.sort(sample), np.arange(n_train)):
        mask = np.zeros(n_train, dtype=bool)
        mask[sample] = stored
        return mask
    if inputs is not None:
        raise AnalysisError(
            f"the store tracked {sample.size} of {n_train} training samples, so its `is_noisy` "
            "does not name every mislabelled sample, and with the data given in Python the "
            "clean labels cannot be rebuilt; leave out the oracle (--method)"
        )
    mask = data.bundle.train.targets.numpy() != data.train.targets.numpy()
    if not np.array_equal(mask[sample], stored):
        raise AnalysisError(
            "the clean labels rebuilt from the store's config disagree with its `is_noisy`; "
            "the data set changed since the recording"
        )
    return mask


@dataclass(frozen=True)
class Ranking:
    """What one row of the table drops: `label` as printed, `method` the `--method` name."""

    label: str
    method: str
    dropped: np.ndarray  # training indices, sorted


def _analyze_command(method: str, test_set: str, out: str | Path | None) -> str:
    option = "" if method == "hydra" else f" --method {method}"
    where = "" if out is None else f" --out {out}"
    return f"hydra-store analyze STORE{option} --test-set {test_set}{where}"


def method_rankings(
    results: Path,
    test_set: str,
    registry: MethodRegistry,
    wanted: Sequence[str] | None,
    *,
    n_train: int,
    count: int,
    out: str | Path | None = None,
    labels: np.ndarray | None = None,
    class_counts: dict[int, int] | None = None,
) -> tuple[list[Ranking], list[str]]:
    """(rankings, what was skipped and why) of every stored C(i) of the methods in `registry`
    (only those named in `wanted`, when given) for `test_set`. Each drops the `count` lowest
    C(i); with `class_counts` (`class_drop_counts`) the `class_counts[c]` lowest within each
    class c of the training `labels` (N,) instead.

    Dropping the r share of the whole training set needs a C(i) for every one of its N samples:
    a ranking over fewer (a recording that tracked a subset) is skipped and named; a method
    asked for by name that has no usable ranking is an error saying which command computes
    one."""
    if (labels is None) != (class_counts is None):
        raise InvalidArgumentError("a drop within classes needs both the labels and the counts")
    rankings: list[Ranking] = []
    skipped: list[str] = []
    for method in registry:
        asked = wanted is not None and method.name in wanted
        if wanted is not None and not asked:
            continue
        found = method.totals(results, test_set)
        if not found and asked:
            raise AnalysisError(
                f"--method {method.name}: no C(i) of it for test set {test_set!r} in {results}; "
                f"compute them first with `{_analyze_command(method.name, test_set, out)}`"
            )
        usable = 0
        for label, (index, values) in found.items():
            index = np.asarray(index, dtype=np.int64)
            values = np.asarray(values, dtype=np.float64)
            covers_all = index.size == n_train and np.array_equal(
                np.sort(index), np.arange(n_train)
            )
            if not covers_all:
                skipped.append(
                    f"{label}: covers {np.unique(index).size} of the {n_train} training samples; "
                    "dropping a share of the whole set needs C(i) of every sample (record with "
                    "--track all, or use --method hydra-exact)"
                )
            elif not np.isfinite(values).all():
                skipped.append(f"{label}: has non-finite C(i)")
            else:
                if class_counts is None:
                    dropped = drop_lowest(index, values, count)
                else:
                    dropped = drop_lowest_within_class(index, values, labels, class_counts)
                rankings.append(Ranking(label, method.name, dropped))
                usable += 1
        if asked and found and not usable:
            raise AnalysisError(f"--method {method.name}: {skipped[-1]}")
    return rankings, skipped


# -- retraining from scratch --------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingRecipe:
    """How `hydra-store record` trained: what the retraining repeats on the kept samples."""

    model: str
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: ScheduleSpec

    @classmethod
    def from_config(cls, config: RecordConfig) -> TrainingRecipe:
        return cls(
            model=config.model,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            schedule=config.schedule_spec(),
        )

    def describe(self) -> str:
        spec = self.schedule
        if spec.name == "step":
            schedule = f"x{spec.resolved_decay():g} every {spec.step_epochs} epochs"
        elif spec.name in ("exponential", "plateau"):
            schedule = f"{spec.name} x{spec.resolved_decay():g}"
        else:
            schedule = spec.name
        return (
            f"{self.model}, {self.epochs} epochs, batch {self.batch_size}, lr {self.lr:g} "
            f"({schedule}), momentum {self.momentum:g}, weight decay {self.weight_decay:g}"
        )


def scheduled_learning_rates(recipe: TrainingRecipe, steps_per_epoch: int) -> np.ndarray:
    """The learning rate of every step of the recipe's schedule (for `plateau`, of the first
    epoch only: later ones depend on the losses)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=recipe.lr)
    epochs = 1 if recipe.schedule.name == "plateau" else recipe.epochs
    schedule = EpochSchedule(optimizer, recipe.schedule, steps_per_epoch * recipe.epochs)
    rates = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()  # no gradient: changes nothing, but torch expects it first
            schedule.after_step()
        schedule.after_epoch(1.0)
    return np.asarray(rates, dtype=np.float64)


def store_recipe(path: str | Path) -> TrainingRecipe:
    """The recipe of a store's `config`, checked against the trajectory it recorded (step
    count, learning rates, momentum, weight decay): a config that does not describe the
    training is refused rather than retrained with."""
    group = open_group(path)
    raw = group.attrs.get("config") or {}
    missing = [key for key in RECIPE_KEYS if key not in raw]
    if raw.get("source") == "user training loop" or missing:
        raise AnalysisError(
            f"clean retrains with the recipe `hydra-store record` saves in a store's config "
            f"(epochs, batch size, learning-rate schedule); {path} was recorded from a user's "
            "own training loop and does not hold it"
        )
    recipe = TrainingRecipe.from_config(recorded_config(group))
    n_train = int(group.attrs["n_train"])
    steps_per_epoch = -(-n_train // recipe.batch_size)
    lr = np.asarray(group["lr"][:], dtype=np.float64)
    expected = scheduled_learning_rates(recipe, steps_per_epoch)
    disagree = []
    if lr.size != recipe.epochs * steps_per_epoch:
        disagree.append(
            f"{lr.size} steps recorded, {recipe.epochs} epochs of {steps_per_epoch} configured"
        )
    elif not np.allclose(lr[: expected.size], expected, rtol=1e-9, atol=0):
        step = int(np.flatnonzero(~np.isclose(lr[: expected.size], expected, rtol=1e-9))[0])
        disagree.append(
            f"step {step + 1} took lr {lr[step]:g}, the configured schedule {expected[step]:g}"
        )
    for name in ("momentum", "weight_decay"):
        values = np.asarray(group[name][:], dtype=np.float64)
        if values.size and not np.allclose(values, getattr(recipe, name), rtol=1e-9, atol=0):
            disagree.append(f"{name} {values[0]:g} recorded, {getattr(recipe, name):g} configured")
    if disagree:
        raise AnalysisError(
            f"the config of {path} does not describe the training it recorded ({'; '.join(disagree)}); "
            "clean retrains with the recorded recipe and cannot here"
        )
    return recipe


def epoch_order(kept: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """One epoch's order of the kept training indices: a random permutation from `generator`
    (as the recorded run draws one of all N)."""
    permutation = torch.randperm(int(kept.size), generator=generator).numpy()
    return np.asarray(kept, dtype=np.int64)[permutation]


def train_from_scratch(
    model: torch.nn.Module,
    train: Split,
    kept: np.ndarray,
    recipe: TrainingRecipe,
    *,
    seed: int,
    loss: PerSampleLoss = CROSS_ENTROPY,
    validation: Split | None = None,
    on_batch: Callable[[np.ndarray], None] | None = None,
) -> list[float]:
    """Train `model` (in place, from the weights it has) on the training samples `kept` with
    `recipe`: torch.optim.SGD with its momentum and weight decay, `recipe.epochs` epochs of
    ceil(n_kept / B) batches in an order drawn from a generator seeded with `seed`, the
    learning rate stepped by the recipe's schedule (`plateau` watching the epoch's training
    loss plus the validation loss, as `record` does). Returns each epoch's training loss;
    `on_batch(indices)` hears every batch before its step.

    Each step's gradient is the batch's mean loss gradient by one backward pass; a model with
    dropout draws its masks from `step_seed(seed, step)`."""
    kept = np.asarray(kept, dtype=np.int64)
    if kept.size == 0:
        raise InvalidArgumentError("nothing to train on: every training sample was dropped")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    layout = ParameterLayout.from_model(model)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        weight_decay=recipe.weight_decay,
    )
    steps_per_epoch = -(-kept.size // recipe.batch_size)
    schedule = EpochSchedule(optimizer, recipe.schedule, steps_per_epoch * recipe.epochs)
    generator = torch.Generator().manual_seed(int(seed))
    dropout = has_dropout(model)
    model.train()
    step, epoch_losses = 0, []
    for _ in range(recipe.epochs):
        order = epoch_order(kept, generator)
        total, count = 0.0, 0
        for start in range(0, kept.size, recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            step += 1
            if on_batch is not None:
                on_batch(batch)
            index = torch.from_numpy(batch)
            x, y = train.inputs[index].to(device, dtype), train.targets[index].to(device)
            with step_randomness(step_seed(seed, step) if dropout else None, device):
                losses, gradient = batch_gradient(model, layout, x, y, loss)
            sgd_step(model, optimizer, layout, gradient)
            schedule.after_step()
            total += float(losses.sum())
            count += batch.size
        epoch_losses.append(total / count)
        monitored = epoch_losses[-1]
        if recipe.schedule.name == "plateau" and validation is not None:
            monitored += evaluate(model, validation.inputs, validation.targets, loss=loss)[0]
        schedule.after_epoch(monitored)
    return epoch_losses


@dataclass(frozen=True)
class _Context:
    recipe: TrainingRecipe
    train: Split
    validation: Split | None
    tests: TestSet
    loss: PerSampleLoss
    input_shape: tuple[int, ...]
    n_classes: int
    dtype: torch.dtype


@functools.lru_cache(maxsize=4)
def _context(path: str, evaluate_on: str, inputs: RunInputs | None) -> _Context:
    """What every retraining task of one store needs, loaded once per process."""
    group = open_group(path)
    data = load_run_data(path, inputs)
    info = group.attrs.get("dataset") or {}
    dtype = torch.float64 if group["weights"].dtype == np.float64 else torch.float32
    return _Context(
        recipe=store_recipe(path),
        train=data.train,
        validation=data.bundle.validation,
        tests=resolve_test_set(path, evaluate_on, run=data),
        loss=recorded_loss(group.attrs.get("loss"), inputs.loss if inputs is not None else None),
        input_shape=tuple(int(s) for s in info.get("input_shape", data.bundle.input_shape)),
        n_classes=len(info.get("class_names") or data.bundle.class_names),
        dtype=dtype,
    )


def retrain_and_score(
    path: str,
    evaluate_on: str,
    kept: np.ndarray,
    seed: int,
    device: str,
    inputs: RunInputs | None = None,
) -> tuple[float, float]:
    """One task: a fresh model (initial weights from `seed`) trained from scratch with the
    store's recipe on the training samples where `kept` (N,) is True; its (accuracy, mean
    loss) on the evaluation set after the last epoch."""
    context = _context(path, evaluate_on, inputs)
    model = build_model(
        context.recipe.model,
        input_shape=context.input_shape,
        n_classes=context.n_classes,
        seed=int(seed),
        dtype=context.dtype,
    ).to(device)
    with flush_denormals():
        train_from_scratch(
            model,
            context.train,
            np.flatnonzero(kept),
            context.recipe,
            seed=int(seed),
            loss=context.loss,
            validation=context.validation,
        )
    tests = context.tests
    test_loss, accuracy = evaluate(model, tests.inputs, tests.targets, loss=context.loss)
    return float(accuracy), float(test_loss)


def clear_context_cache() -> None:
    """Forget what the retraining tasks of this process loaded: a store may have changed."""
    _context.cache_clear()


# -- the experiment -----------------------------------------------------------------------------


def _spread(values: np.ndarray) -> float:
    """The standard deviation over seeds (ddof 1; 0 for one seed)."""
    return float(np.std(values, ddof=1)) if values.size > 1 else 0.0


@dataclass
class CleaningSummary:
    path: Path
    group: str
    test_set: str
    evaluate_on: str
    rate: float
    noise_rate: float
    n_train: int
    n_drop: int
    recipe: TrainingRecipe
    seeds: np.ndarray
    labels: list[str]
    methods: list[str]  # the --method name of each ranking
    accuracy: np.ndarray  # (ranking, seed)
    n_dropped: np.ndarray  # (ranking,)
    mislabelled_dropped: np.ndarray  # (ranking,); -1 when the noise is unknown
    skipped: list[str]
    leaks: bool
    png: Path | None
    seconds: float
    within_class: bool = False  # dropped within each training class

    def lines(self) -> list[str]:
        seeds = self.seeds
        span = f"seed {seeds[0]}" if seeds.size == 1 else f"seeds {seeds[0]}-{seeds[-1]}"
        within = (
            ", dropped within each class (the same share of every training label; random: as "
            "many of each class at random)"
            if self.within_class
            else ""
        )
        out = [
            f"cleaning at rate {self.rate:g} (injected noise {self.noise_rate:g}): each ranking "
            f"drops the {self.n_drop} of {self.n_train} training samples with the lowest C(i) on "
            f"{self.test_set!r}{within}; retrained from scratch on the rest "
            f"({self.recipe.describe()}), {span}; final accuracy on {self.evaluate_on!r}, in "
            f"{self.seconds:.1f} s",
        ]
        width = max(len("ranking"), *(len(label) for label in self.labels))
        out.append(
            f"{'ranking':<{width}} {'dropped':>8} {'of them mislabelled':>20} "
            f"{'accuracy, mean ± std':>22}"
        )
        for n, label in enumerate(self.labels):
            values = 100 * self.accuracy[n]
            wrong = int(self.mislabelled_dropped[n])
            out.append(
                f"{label:<{width}} {int(self.n_dropped[n]):>8} "
                f"{wrong if wrong >= 0 else '-':>20} "
                f"{f'{values.mean():.2f}% ± {_spread(values):.2f}':>22}"
            )
        out += [f"skipped {s}" for s in self.skipped]
        if self.leaks:
            out.append(
                f"note: the ranking used C(i) on {self.test_set!r}, the set the accuracy is "
                "measured on: its labels chose the dropped samples, so the accuracies are "
                "optimistic; record with --validation-fraction and rank by the validation split"
            )
        out.append(
            "the paper (accuracy after 20 epochs; 50,000 training samples, CIFAR-10 40,000):"
        )
        for name, table in PAPER_TABLE3.items():
            rows = "; ".join(
                f"{rate:.0%} noise: "
                + ", ".join(f"{method} {value:.2f}%" for method, value in table[rate].items())
                for rate in sorted(table)
            )
            out.append(f"  {name}: {rows}")
        if self.png is not None:
            out.append(f"plot: {self.png}")
        out.append(f"written to {self.path}/{self.group}")
        return out


def plot_cleaning(out: Path, labels: list[str], accuracy: np.ndarray, title: str) -> None:
    """Mean accuracy per ranking with its spread over seeds (error bars) and every seed's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hydra_store.analysis.plots import save_png

    values = 100 * accuracy
    means = values.mean(axis=1)
    spreads = np.array([_spread(row) for row in values])
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2), 4.2))
    positions = np.arange(len(labels))
    ax.bar(positions, means, yerr=spreads, capsize=4, color="#7aa6c2", label="mean ± std")
    for n, row in enumerate(values):
        ax.plot(np.full(row.size, n), row, "k.", markersize=4)
    for n, (mean, spread) in enumerate(zip(means, spreads, strict=True)):
        ax.text(n, mean + spread + 1, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, labels=labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9, wrap=True)
    fig.tight_layout()
    save_png(fig, out, dpi=110)
    plt.close(fig)


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
        )


@reads_store
def run_cleaning(
    path: str | Path,
    config: CleanConfig | str | None = None,
    *,
    progress: Progress | None = None,
    methods: MethodRegistry | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> CleaningSummary:
    """The paper's Table 3 on a store: for each ranking (the stored C(i) of every method in
    `methods`, default the built-in ones, and `no filtering`, `random`, `oracle`), drop the
    round(rate N) least useful training samples, retrain from scratch on the rest with the
    store's recipe once per seed (an independent task each, on `scheduler`), and write the
    final accuracies to `cleaning/<test set>` with a bar chart beside the results store.

    `config` is a CleanConfig, or the ranking test set's name (None: the default choice) with
    its fields as keyword options. `inputs`: the data and loss given in Python
    (`hydra_store.RunInputs`), for a store whose data set cannot be rebuilt (its recipe must
    still be the store's). `out`: a results store to read the rankings from and write the group
    to instead of the recording (the PNG then goes beside it)."""
    if options.get("rankings") is not None:
        options["rankings"] = tuple(options["rankings"])
    if config is None:
        config = CleanConfig(**options)
    else:
        config = resolve_config(CleanConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    recording = open_group(path)
    require_complete(recording, path)
    recipe = store_recipe(path)
    recorded = recorded_config(recording)
    data = load_run_data(path, inputs)
    loss = recorded_loss(recording.attrs.get("loss"), inputs.loss if inputs is not None else None)
    if not loss.classification:
        raise AnalysisError(
            "clean measures accuracy and drops mislabelled samples: it needs a classification "
            f"loss, and {path} was trained with {loss.spec!r}"
        )
    test_set = config.test_set
    if test_set is None:
        test_set = "validation" if data.bundle.validation is not None else "test"
    for spec in (test_set, config.evaluate_on):  # refuse a bad set before any work
        resolve_test_set(path, spec, run=data)
    config = dataclasses.replace(config, test_set=test_set)
    device = config.device or recorded.device
    _check_device(device)
    registry = methods or default_methods()
    known = set(registry.names()) | set(REFERENCES)
    for name in config.rankings or ():
        if name not in known:
            raise InvalidArgumentError(
                f"--method {name}: unknown; choose from {', '.join(sorted(known))}"
            )
    n_train = len(data.train)
    rate = recorded.label_noise if config.rate is None else config.rate
    if config.rate is None and rate == 0:
        raise InvalidArgumentError(
            f"{path} injected no label noise, so there is no default rate: give --rate, the "
            "share of the training set to drop"
        )
    count = drop_count(rate, n_train)
    labels = class_counts = None
    if config.within_class:
        labels = data.train.targets.numpy()
        class_counts = class_drop_counts(rate, labels)
    wanted = config.rankings
    results = results_root(path, out)
    found, skipped = method_rankings(
        results,
        test_set,
        registry,
        wanted,
        n_train=n_train,
        count=count,
        out=out,
        labels=labels,
        class_counts=class_counts,
    )
    if wanted is None and not found:
        skipped.append(
            f"every method: none has C(i) for test set {test_set!r} in {results}; compute them "
            f"with e.g. `{_analyze_command('hydra-exact', test_set, out)}`"
        )
    try:
        noisy = mislabelled(path, data, inputs)
    except AnalysisError as error:
        if wanted is not None and "oracle" in wanted:
            raise
        noisy = None
        skipped.append(f"oracle: {error}")
    random_dropped = (
        random_drop(n_train, count, config.seed)
        if class_counts is None
        else random_drop_within_class(labels, class_counts, config.seed)
    )
    rankings = _with_references(found, wanted, random_dropped, noisy, skipped)
    seeds = np.arange(config.seeds, dtype=np.int64)
    masks = []
    for ranking in rankings:
        keep = np.ones(n_train, dtype=bool)
        keep[ranking.dropped] = False
        masks.append(keep)
    clear_context_cache()  # the store may have changed since an earlier call in this process
    scored = map_tasks(
        retrain_and_score,
        [
            (str(path), config.evaluate_on, keep, int(s), device, inputs)
            for keep in masks
            for s in seeds
        ],
        scheduler=config.scheduler,
        progress=progress,
        description="retraining from scratch",
        n_workers=config.workers,
    )
    shape = (len(rankings), seeds.size)
    accuracy = np.array([a for a, _ in scored], dtype=np.float64).reshape(shape)
    test_loss = np.array([b for _, b in scored], dtype=np.float64).reshape(shape)
    names = [r.label for r in rankings]
    dropped = ~np.stack(masks)
    n_dropped = dropped.sum(axis=1)
    wrong = (
        (dropped & noisy[None, :]).sum(axis=1) if noisy is not None else np.full(len(rankings), -1)
    )
    name = group_name(test_set)
    group = f"{CLEAN_GROUP}/{name}"
    png = (
        store_path(config.png)
        if config.png is not None
        else results.with_name(f"{results.stem}-clean-{name}.png")
    )
    within = ", within each class" if config.within_class else ""
    plot_cleaning(
        png,
        names,
        accuracy,
        f"retrained from scratch without the {count} of {n_train} training samples each "
        f"ranking drops{within}\n(rate {rate:g}; ranked by C(i) on {test_set}, accuracy on "
        f"{config.evaluate_on}; {seeds.size} seeds: mean ± std and each seed)",
    )
    seconds = time.perf_counter() - started
    leaks = group_name(test_set) == group_name(config.evaluate_on)
    arrays = _arrays(rankings, seeds, accuracy, test_loss, dropped, wrong, noisy)
    attrs = {
        "config": _json_config(config),
        "rate": rate,
        "noise_rate": recorded.label_noise,
        "n_train": n_train,
        "n_drop": count,
        "within_class": config.within_class,
        "class_drop_counts": (
            {str(c): n for c, n in class_counts.items()} if class_counts is not None else None
        ),
        "ranked_by": test_set,
        "evaluated_on": config.evaluate_on,
        "ranking_leaks_evaluation_labels": leaks,
        "recipe": _json_config(recipe),
        "device": device,
        "skipped": skipped,
        "png": str(png),
        "paper_table3": {
            dataset: {f"{noise:g}": row for noise, row in table.items()}
            for dataset, table in PAPER_TABLE3.items()
        },
        "seconds": seconds,
    }
    write_result_group(results, group, arrays, attrs)
    return CleaningSummary(
        path=results,
        group=group,
        test_set=test_set,
        evaluate_on=config.evaluate_on,
        rate=rate,
        noise_rate=recorded.label_noise,
        n_train=n_train,
        n_drop=count,
        recipe=recipe,
        seeds=seeds,
        labels=names,
        methods=[r.method for r in rankings],
        accuracy=accuracy,
        n_dropped=n_dropped,
        mislabelled_dropped=wrong,
        skipped=skipped,
        leaks=leaks,
        png=png,
        seconds=seconds,
        within_class=config.within_class,
    )


def _with_references(
    found: list[Ranking],
    wanted: Sequence[str] | None,
    random_dropped: np.ndarray,
    noisy: np.ndarray | None,
    skipped: list[str],
) -> list[Ranking]:
    """`no filtering` and `random` (dropping `random_dropped`) first, the methods' rankings, then
    `oracle`; only those named in `wanted` when given."""

    def asked(name: str) -> bool:
        return wanted is None or name in wanted

    rows = []
    if asked("none"):
        rows.append(Ranking(NO_FILTERING, "none", np.zeros(0, dtype=np.int64)))
    if asked("random"):
        rows.append(Ranking(RANDOM, "random", random_dropped))
    rows += found
    if asked("oracle"):
        if noisy is not None:
            rows.append(Ranking(ORACLE, "oracle", np.flatnonzero(noisy).astype(np.int64)))
        elif wanted is not None:
            raise AnalysisError(
                "--method oracle: the store injected no label noise, so no sample is known to "
                "be mislabelled"
            )
        else:
            skipped.append("oracle: the store injected no label noise")
    if not rows:
        raise AnalysisError("no ranking to retrain with")
    return rows


def _arrays(
    rankings: list[Ranking],
    seeds: np.ndarray,
    accuracy: np.ndarray,
    test_loss: np.ndarray,
    dropped: np.ndarray,
    wrong: np.ndarray,
    noisy: np.ndarray | None,
) -> dict[str, ArraySpec]:
    arrays: dict[str, ArraySpec] = {
        "ranking": (np.array([r.label for r in rankings], dtype=object), ("ranking",), {}),
        "method": (
            np.array([r.method for r in rankings], dtype=object),
            ("ranking",),
            {"long_name": "the --method name of the ranking"},
        ),
        "seed": (seeds, ("seed",), {"long_name": "model initialisation and batch order"}),
        "accuracy": (
            accuracy,
            ("ranking", "seed"),
            {"long_name": "accuracy on the evaluation set after the last epoch"},
        ),
        "test_loss": (
            test_loss,
            ("ranking", "seed"),
            {"long_name": "mean loss on the evaluation set after the last epoch"},
        ),
        "dropped": (
            dropped,
            ("ranking", "train"),
            {"long_name": "training sample i was dropped by the ranking"},
        ),
        "n_dropped": (dropped.sum(axis=1), ("ranking",), {}),
        "mislabelled_dropped": (
            np.asarray(wrong, dtype=np.int64),
            ("ranking",),
            {"long_name": "mislabelled samples among those dropped (-1: noise unknown)"},
        ),
    }
    if noisy is not None:
        arrays["is_noisy"] = (noisy, ("train",), {"long_name": "the label was changed by noise"})
    return arrays


def _json_config(config: Any) -> dict[str, Any]:
    values = asdict(config)
    for key, value in values.items():
        if isinstance(value, tuple):
            values[key] = list(value)
    return values
