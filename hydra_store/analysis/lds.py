"""The linear datamodeling score (LDS): how well a method's contributions, added up over a
subset of the training set, predict the test losses of the model trained on that subset.

The standard metric of TRAK (Park et al., 2023) and dattri (`dattri.metric.lds`). Here:

1. M random subsets S_1..S_M of the training set, each of round(alpha N) samples, drawn from
   the seed (`draw_subsets`).
2. For each subset, retraining through the stored trajectory (checkpoint 0, the same batches,
   learning rates, momentum and weight decay) with the loss weight 1 for the samples in S and 0
   for the others (`validation.retrain_weighted`), one independent task per subset on the task
   fan-out; then the loss of every test sample in eval mode: L_j(S).
3. The prediction of a method with per-test contributions C(i, j) (positive: removing i raises
   the loss of test sample j, i.e. i helps): dropping the complement of S is ε_i = -1/N for
   every i outside S, so to first order

       L_j(S) ≈ L_j(full) + Σ_{i ∉ S} C(i, j)  =: L_j(full) + P_j(S)

   (`predicted_changes`; samples a method does not cover, e.g. untracked ones, add nothing).
4. LDS_j = Spearman over the M subsets between P_j(S) and L_j(S) (`lds_scores`); reported as
   its mean (and spread) over the test samples the method covers.

Since Σ_{i ∉ S} C = Σ_i C - Σ_{i ∈ S} C, this is dattri's Spearman between Σ_{i ∈ S} score and
the flipped target (-loss), with C as the score: a perfect predictor scores 1, a reversed one
-1. Methods with totals C(i) only get the "LDS of the mean test loss": one Spearman over the
subsets between Σ_{i ∉ S} C(i) and the measured mean test loss.

Unlike TRAK's and dattri's retrainings (a fresh run on each subset, new batches, new seeds),
these follow the stored run exactly, only with some samples' losses weighted 0: the
perturbation HyDRA's hypergradient is the derivative of, with no seed noise in the measured
losses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from hydra_store.analysis.methods import (
    MethodRegistry,
    PerTestArray,
    default_methods,
    per_test_arrays,
)
from hydra_store.analysis.test_sets import group_name
from hydra_store.analysis.validation import clear_context_cache, retrained_test_losses
from hydra_store.arguments import LdsConfig, resolve_config
from hydra_store.errors import AnalysisError, InvalidArgumentError, StoreFormatError
from hydra_store.execution import map_tasks
from hydra_store.replay.recorded_run import RunInputs
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]
ArraySpec = tuple[np.ndarray, tuple[str, ...], dict[str, Any]]

LDS_GROUP = "lds"  # under reverse/<test set>
# Rows of a (train, test) contribution array read at once when summing over subsets.
BLOCK_BYTES = 64 * 2**20
_NOTHING_TO_SCORE = (
    "no contribution method has results for test set {test_set!r} in {where}; run e.g. "
    "`hydra-store analyze STORE --method hydra-exact --per-test 50` (per-test contributions; "
    "with the same --out) first"
)
SIGN_CONVENTION = (
    "predicted_*: sum over the training samples left out of the subset of C(i, j) (positive: "
    "removing i raises the loss of test j), the first-order change of the test loss; "
    "LDS: Spearman over the subsets between it and the measured test loss"
)


# -- the metric ---------------------------------------------------------------------------------


def draw_subsets(n_train: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """(count, n_train) bool: row m marks the round(fraction x n_train) training samples of
    subset m, each drawn without replacement, reproducibly from `seed`."""
    size = round(fraction * n_train)
    if not 1 <= size < n_train:
        raise InvalidArgumentError(
            f"--lds-fraction {fraction}: a subset of {size} of the {n_train} training samples "
            "is empty or the whole set; choose a fraction that keeps some and drops some"
        )
    rng = np.random.default_rng([seed, 0x1D5])
    masks = np.zeros((count, n_train), dtype=bool)
    for row in masks:
        row[rng.choice(n_train, size=size, replace=False)] = True
    return masks


def predicted_changes(contributions: Any, index: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """P(S_m, j) = Σ_{i ∉ S_m} C(i, j), (M, T) float64, the first-order change of the loss of
    test sample j when the samples outside subset m are left out.

    `contributions`: (n, T) (or (n,) for totals) over the training samples `index` (n,); a numpy
    array or a zarr array, read in blocks of rows. `masks`: (M, N) bool, from `draw_subsets`."""
    index = np.asarray(index, dtype=np.int64)
    left_out = ~masks[:, index]  # (M, n)
    shape = tuple(contributions.shape)
    total = np.zeros((masks.shape[0], *shape[1:]), dtype=np.float64)
    width = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    rows = max(1, BLOCK_BYTES // (8 * max(1, width)))
    for start in range(0, shape[0], rows):
        block = np.asarray(contributions[start : start + rows], dtype=np.float64)
        total += left_out[:, start : start + rows].astype(np.float64) @ block
    return total


def lds_scores(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Spearman correlation over the subsets (axis 0) for each column: (M, T), (M, T) -> (T,);
    ties get their average rank, a column constant on either side gets NaN."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if predicted.shape != measured.shape or predicted.ndim != 2:
        raise InvalidArgumentError(
            f"predicted {predicted.shape} and measured {measured.shape} must both be (subsets, "
            "tests)"
        )
    a = pd.DataFrame(predicted).rank(axis=0).to_numpy()
    b = pd.DataFrame(measured).rank(axis=0).to_numpy()
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    norm = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (a * b).sum(axis=0) / norm, np.nan)


# -- what the store holds -----------------------------------------------------------------------


def _at_last_checkpoint(attrs: Any, n_checkpoints: int) -> bool:
    """False when a result group says it was computed at a checkpoint before the last (its
    contributions then predict another model than the one the subsets retrain)."""
    config = attrs.get("config")
    last = n_checkpoints - 1
    nested = config.get("checkpoint") if isinstance(config, dict) else None
    for value in (attrs.get("checkpoint"), nested):
        if isinstance(value, int) and not isinstance(value, bool) and value % n_checkpoints != last:
            return False
    return True


def find_contributions(
    results: Path, test_set: str, methods: MethodRegistry, n_checkpoints: int
) -> tuple[list[PerTestArray], dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """(per-test contributions, totals C(i) by label, what was skipped and why) of every method
    in `methods` that has results for `test_set` in `results`, at the last checkpoint."""
    root = open_group(results)
    per_test: list[PerTestArray] = []
    totals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: list[str] = []
    for method in methods:
        name = f"{method.group}/{group_name(test_set)}"
        try:
            group = root[name]
        except KeyError:
            continue
        if not isinstance(group, zarr.Group):
            continue
        if not _at_last_checkpoint(group.attrs, n_checkpoints):
            skipped.append(f"{name} ({method.name}): computed at an earlier checkpoint")
            continue
        per_test += per_test_arrays(group, method, root)
        totals.update(method.totals(results, test_set))
    return per_test, totals, skipped


# -- the analysis -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodLds:
    """The LDS of one method's per-test contributions: over the test samples it covers, and
    over those every per-test method covers (`common`)."""

    method: str
    n_test: int
    mean: float
    std: float
    median: float
    n_common: int
    mean_common: float


@dataclass(frozen=True)
class MeanLossLds:
    """Spearman over the subsets between Σ_{i ∉ S} C(i) and the measured mean test loss."""

    method: str
    n_samples: int
    lds: float


@dataclass
class LdsSummary:
    path: Path
    test_set: str
    n_train: int
    n_subsets: int
    subset_size: int
    fraction: float
    seed: int
    per_test: list[MethodLds]
    mean_loss: list[MeanLossLds]
    skipped: list[str]
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"linear datamodeling score: {self.n_subsets} retrainings through the stored "
            f"trajectory, each on a random subset of {self.subset_size} of the {self.n_train} "
            f"training samples (fraction {self.fraction:g}, seed {self.seed}), in "
            f"{self.seconds:.1f} s",
        ]
        if self.per_test:
            common = self.per_test[0].n_common
            out += [
                "LDS per test sample: Spearman over the subsets between the predicted "
                "sum of C(i, j) over the samples left out and the measured test loss; over "
                f"the test samples each method covers (common: the {common} all cover):",
                f"{'method':<36} {'tests':>6} {'mean':>8} {'std':>7} {'median':>8} {'common':>8}",
            ]
            for m in self.per_test:
                out.append(
                    f"{m.method:<36} {m.n_test:>6} {m.mean:>8.4f} {m.std:>7.4f} "
                    f"{m.median:>8.4f} {m.mean_common:>8.4f}"
                )
        else:
            out.append("no method has per-test contributions C(i, j) for this test set")
        if self.mean_loss:
            out += [
                "LDS of the mean test loss (from the totals C(i); one Spearman over the "
                f"{self.n_subsets} subsets, not the per-test LDS):",
                f"{'method':<44} {'samples':>8} {'LDS':>8}",
            ]
            for t in self.mean_loss:
                out.append(f"{t.method:<44} {t.n_samples:>8} {t.lds:>8.4f}")
        out += [f"skipped {s}" for s in self.skipped]
        out.append(f"written to {self.path}/reverse/{self.test_set}/{LDS_GROUP}")
        return out


@reads_store
def run_lds(
    path: str | Path,
    config: LdsConfig | str = "test",
    *,
    progress: Progress | None = None,
    methods: MethodRegistry | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> LdsSummary:
    """The linear datamodeling score of every method in `methods` (default: the built-in ones)
    that has results for the test set, written to `reverse/<test set>/lds`.

    Retrains through the stored trajectory on `subsets` random subsets of round(`fraction` x N)
    training samples (an independent task each, plus one on the whole set, on `scheduler`),
    and scores each method's predicted test-loss changes against the measured test losses (the
    module's docstring gives the definition). `config` is an LdsConfig, or the test set's name
    with its fields as keyword options. `inputs`: the model, data and loss given in Python
    (`hydra_store.RunInputs`), for a store that does not name them. `out`: a results store to
    read the methods' results from and write the group to instead of the recording. `device`:
    where the retrainings run."""
    config = resolve_config(LdsConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    recording = open_group(path)
    require_complete(recording, path)
    n_train = int(recording.attrs["n_train"])
    n_checkpoints = int(recording["checkpoint_step"].shape[0])
    try:  # methods' results to score: none in a results store not written yet
        results = results_root(path, out, create=False)
    except StoreFormatError:
        raise AnalysisError(_NOTHING_TO_SCORE.format(test_set=config.test_set, where=out)) from None
    methods = methods or default_methods()
    per_test, totals, skipped = find_contributions(results, config.test_set, methods, n_checkpoints)
    name = group_name(config.test_set)
    if not per_test and not totals:
        raise AnalysisError(_NOTHING_TO_SCORE.format(test_set=config.test_set, where=results))
    masks = draw_subsets(n_train, config.subsets, config.fraction, config.seed)
    clear_context_cache()  # the store may have changed since an earlier call in this process
    jobs = [None, *masks]  # loss weights: all 1, then each subset's 0/1 mask
    losses = map_tasks(
        retrained_test_losses,
        [(str(path), config.test_set, weights, inputs, config.device) for weights in jobs],
        scheduler=config.scheduler,
        progress=progress,
        description="LDS retraining on subsets",
    )
    full = np.asarray(losses[0], dtype=np.float64)
    measured = np.stack([np.asarray(x, dtype=np.float64) for x in losses[1:]])
    per_test_scores, arrays = _score_per_test(per_test, masks, measured)
    mean_loss_scores, total_arrays = _score_totals(totals, masks, measured)
    arrays = _measured_arrays(masks, full, measured) | arrays | total_arrays
    seconds = time.perf_counter() - started
    attrs = {
        "config": asdict(config),
        "n_train": n_train,
        "subset_size": int(masks[0].sum()),
        "sign_convention": SIGN_CONVENTION,
        "lds": [_json_safe(asdict(m)) for m in per_test_scores],
        "mean_loss_lds": [_json_safe(asdict(t)) for t in mean_loss_scores],
        "skipped": skipped,
        "seconds": seconds,
    }
    write_result_group(results, f"reverse/{name}/{LDS_GROUP}", arrays, attrs)
    return LdsSummary(
        path=results,
        test_set=name,
        n_train=n_train,
        n_subsets=config.subsets,
        subset_size=int(masks[0].sum()),
        fraction=config.fraction,
        seed=config.seed,
        per_test=per_test_scores,
        mean_loss=mean_loss_scores,
        skipped=skipped,
        seconds=seconds,
    )


def _measured_arrays(masks: np.ndarray, full: np.ndarray, measured: np.ndarray):
    m, n_test = measured.shape
    return {
        "subset": (np.arange(m, dtype=np.int64), ("subset",), {}),
        "subset_mask": (
            masks,
            ("subset", "train"),
            {"long_name": "training sample i is in subset m (loss weight 1; else 0)"},
        ),
        "test": (np.arange(n_test, dtype=np.int64), ("test",), {}),
        "test_loss_full": (
            full,
            ("test",),
            {"long_name": "per-sample test loss, retrained on the whole training set"},
        ),
        "test_loss": (
            measured,
            ("subset", "test"),
            {"long_name": "per-sample test loss, retrained on the subset"},
        ),
        "mean_test_loss": (
            measured.mean(axis=1),
            ("subset",),
            {"long_name": "mean test loss, retrained on the subset"},
        ),
    }


def _safe(label: str, taken: set[str]) -> str:
    """A variable-name suffix for a method's label, unique among `taken`."""
    safe = "_".join("".join(c if c.isalnum() else " " for c in label).split())
    candidate, n = safe, 2
    while candidate in taken:
        candidate, n = f"{safe}_{n}", n + 1
    taken.add(candidate)
    return candidate


def _score_per_test(
    per_test: list[PerTestArray], masks: np.ndarray, measured: np.ndarray
) -> tuple[list[MethodLds], dict[str, ArraySpec]]:
    n_test = measured.shape[1]
    scored: list[tuple[PerTestArray, np.ndarray, np.ndarray]] = []
    arrays: dict[str, ArraySpec] = {}
    taken: set[str] = set()
    for found in per_test:
        if found.test.size and (found.test.min() < 0 or found.test.max() >= n_test):
            raise AnalysisError(
                f"{found.label}: its test indices exceed the test set's {n_test} samples"
            )
        if found.train.size and found.train.max() >= masks.shape[1]:
            raise AnalysisError(
                f"{found.label}: its training indices exceed the {masks.shape[1]} samples"
            )
        predicted = np.full(measured.shape, np.nan)
        predicted[:, found.test] = predicted_changes(found.values, found.train, masks)
        scores = np.full(n_test, np.nan)
        scores[found.test] = lds_scores(predicted[:, found.test], measured[:, found.test])
        scored.append((found, predicted, scores))
        safe = _safe(found.label, taken)
        variable_attrs = {
            "method": found.method,
            "label": found.label,
            "source": found.long_name,
        }
        arrays[f"predicted_{safe}"] = (predicted, ("subset", "test"), variable_attrs)
        arrays[f"lds_{safe}"] = (scores, ("test",), variable_attrs)
    common = np.ones(n_test, dtype=bool)
    for found, _, _ in scored:
        covered = np.zeros(n_test, dtype=bool)
        covered[found.test] = True
        common &= covered
    results = []
    for found, _, scores in scored:
        own = scores[found.test]
        results.append(
            MethodLds(
                method=found.label,
                n_test=int(found.test.size),
                mean=_nan_stat(np.nanmean, own),
                std=_nan_stat(np.nanstd, own),
                median=_nan_stat(np.nanmedian, own),
                n_common=int(common.sum()),
                mean_common=_nan_stat(np.nanmean, scores[common]),
            )
        )
    return results, arrays


def _score_totals(
    totals: dict[str, tuple[np.ndarray, np.ndarray]], masks: np.ndarray, measured: np.ndarray
) -> tuple[list[MeanLossLds], dict[str, ArraySpec]]:
    mean_loss = measured.mean(axis=1)
    results, arrays, taken = [], {}, set()
    for label, (index, values) in totals.items():
        index = np.asarray(index, dtype=np.int64)
        if index.size and index.max() >= masks.shape[1]:
            raise AnalysisError(f"{label}: its training indices exceed the training set")
        predicted = predicted_changes(np.asarray(values, dtype=np.float64), index, masks)
        lds = float(lds_scores(predicted[:, None], mean_loss[:, None])[0])
        results.append(MeanLossLds(method=label, n_samples=int(index.size), lds=lds))
        arrays[f"predicted_mean_{_safe(label, taken)}"] = (
            predicted,
            ("subset",),
            {"label": label, "long_name": "sum of C(i) over the samples left out"},
        )
    return results, arrays


def _nan_stat(function: Callable[[np.ndarray], Any], values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(function(finite)) if finite.size else float("nan")


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """NaN as None: the group's attributes are JSON."""
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
