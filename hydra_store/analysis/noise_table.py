"""The paper's Table 4 for every contribution method: cluster each training class on features of
each method's per-test contributions C(i, j), and score the suspects against the injected label
noise (Jaccard indices for the correct and the random labels, averaged over classes) with the
AUC of the method's total C(i) beside. Written to `clustering/<test set>`.

Every (train, test) or (sample, test) array of C(i, j) in a method's result group is one row
(`analysis:contribution`, `reverse:contribution_exact`, `reverse:contribution_approx`,
`influence:contribution`, ...); its C(i) is the group's `total_<name>` when there is one, else
the mean over the array's test samples. The truth is the recording's `is_noisy` (record
`--label-noise`), so only tracked samples are scored.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from hydra_store.analysis.clustering import (
    FEATURES,
    PAPER_FEATURES,
    NoiseScores,
    cluster_samples,
    noise_scores,
)
from hydra_store.analysis.methods import MethodRegistry, default_methods, per_test_arrays
from hydra_store.analysis.test_sets import group_name
from hydra_store.arguments import ClusteringConfig, resolve_config
from hydra_store.errors import AnalysisError
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]
CLUSTERING_GROUP = "clustering"

# The paper's Table 4: Jaccard index (correct labels, random labels), 50% label noise.
PAPER_TABLE4: dict[str, tuple[float, float]] = {
    "MNIST, HyDRA": (0.9713, 0.9716),
    "MNIST, influence functions": (0.7189, 0.6719),
    "Fashion-MNIST, HyDRA": (0.7806, 0.7773),
    "Fashion-MNIST, influence functions": (0.4126, 0.3322),
}


@dataclass(frozen=True)
class PerTestSource:
    """One method's C(i, j) for a test set, with its C(i) and the labels of its test samples."""

    label: str  # "<group>:<variable>"
    method: str  # the method's registry name
    train: np.ndarray  # training-set index of each row
    test: np.ndarray  # test-set index of each column
    values: Any = field(repr=False)  # (rows, tests) zarr array, read lazily
    total: np.ndarray = field(repr=False)  # C(i) of each row
    total_source: str = ""  # the array C(i) was read from, or "mean over its test samples"
    test_labels: np.ndarray | None = field(default=None, repr=False)


def _dims(array: zarr.Array) -> tuple[str, ...]:
    return tuple(array.metadata.dimension_names or ())


def per_test_sources(
    results: Path, test_set: str, methods: MethodRegistry, recording: Path | None = None
) -> list[PerTestSource]:
    """Every (train, test) or (sample, test) array of C(i, j) of every method in `methods` that
    has results for `test_set` in the store `results` (a `sample` axis may have its index at the
    root of the recording, `recording`)."""
    root = open_group(results)
    holders_root = (root,) if recording is None else (root, open_group(recording))
    found: list[PerTestSource] = []
    for method in methods:
        try:
            group = root[f"{method.group}/{group_name(test_set)}"]
        except KeyError:
            continue
        if not isinstance(group, zarr.Group):
            continue
        labels = group.get("test_label")
        test_labels = None if labels is None else np.asarray(labels[:], dtype=np.int64)
        for array in per_test_arrays(group, method, *holders_root):
            key = array.label.split(":", 1)[1]
            total_name = f"total_{key}"
            total_array = group.get(total_name)
            if (
                isinstance(total_array, zarr.Array)
                and _dims(total_array) == _dims(array.values)[:1]
                and total_array.shape == (array.train.size,)
            ):
                total = np.asarray(total_array[:], dtype=np.float64)
                source = f"{method.group}:{total_name}"
            else:
                mean = da.from_zarr(array.values).mean(axis=1, dtype=np.float64)
                total = np.asarray(mean.compute())
                source = "mean over its test samples"
            found.append(
                PerTestSource(
                    label=array.label,
                    method=array.method,
                    train=array.train,
                    test=array.test,
                    values=array.values,
                    total=total,
                    total_source=source,
                    test_labels=test_labels,
                )
            )
    return found


@dataclass(frozen=True)
class MethodNoiseScores:
    """One row of the table: a method's per-test contributions, clustered on each feature set."""

    label: str
    method: str
    n_test: int  # test samples of the method's C(i, j)
    n_samples: int  # tracked training samples scored
    total_source: str
    scores: dict[str, NoiseScores]  # by features (the chosen ones, then the paper's signs)
    suspect: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # by features


@dataclass
class NoiseTable:
    """The paper's Table 4 for every method with per-test contributions."""

    path: Path
    group: str
    test_set: str
    features: list[str]
    noise_rate: float
    rows: list[MethodNoiseScores]
    skipped: list[str]
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"finding the injected label noise ({self.noise_rate:.0%} of the tracked samples) "
            f"by clustering each method's C(i, j) per training class; written to {self.path}/"
            f"{self.group}",
            "Jaccard index correct / random labels (per class, averaged over classes); AUC of "
            "-C(i)",
        ]
        width = max([len(r.label) for r in self.rows] + [len("method: C(i, j)")])
        head = f"{'method: C(i, j)':<{width}} {'tests':>6}"
        head += "".join(f" {f:>15}" for f in self.features) + f" {'AUC':>6}"
        out.append(head)
        for row in self.rows:
            cells = "".join(
                f" {row.scores[f].jaccard_clean:>7.3f}/{row.scores[f].jaccard_noisy:<7.3f}"
                for f in self.features
            )
            auc = next(iter(row.scores.values())).auc
            out.append(f"{row.label:<{width}} {row.n_test:>6}{cells} {auc:>6.3f}")
        if not self.rows:
            out.append("(no method has per-test contributions for this test set)")
        out.append("the paper's Table 4 (50% noise, 1,000 validation samples, signs):")
        for name, (correct, random) in PAPER_TABLE4.items():
            out.append(f"  {name:<36} {correct:.3f}/{random:.3f}")
        out.append("a random split of a half-mislabelled class scores about 0.33")
        out += [f"skipped: {reason}" for reason in self.skipped]
        return out


def _noise_truth(recording: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(training index, training label, is_noisy) of the recording's tracked samples."""
    ds = xr.open_zarr(str(recording))
    if "is_noisy" not in ds.variables:
        raise AnalysisError(
            f"{recording} was recorded without injected label noise, so there is nothing to "
            "score the clusters against; record with `--label-noise R`"
        )
    return (
        ds["sample"].values.astype(np.int64),
        ds["label"].values.astype(np.int64),
        ds["is_noisy"].values.astype(bool),
    )


def score_source(
    source: PerTestSource,
    sample: np.ndarray,
    labels: np.ndarray,
    is_noisy: np.ndarray,
    features: list[str],
    n_tests: int,
    seed: int,
) -> MethodNoiseScores:
    """Cluster one method's C(i, j) on each feature set and score the suspects against the
    truth of the tracked samples it covers (`sample`, `labels`, `is_noisy`: the recording's)."""
    position = {int(s): k for k, s in enumerate(sample)}
    rows = np.asarray([r for r, t in enumerate(source.train) if int(t) in position], dtype=int)
    if rows.size == 0:
        raise AnalysisError(f"{source.label} covers none of the tracked training samples")
    where = np.asarray([position[int(t)] for t in source.train[rows]], dtype=np.int64)
    data = da.from_zarr(source.values)
    if rows.size != source.train.size or np.any(np.diff(rows) != 1):
        data = data[rows]
    contribution = xr.DataArray(data, dims=("train", "test"))
    total = source.total[rows]
    scores, suspects = {}, {}
    for chosen in features:
        clusters = cluster_samples(
            contribution,
            labels[where],
            total,
            features=chosen,
            n_tests=n_tests,
            seed=seed,
            test_labels=source.test_labels,
        )
        suspect = clusters["suspect"].values
        scores[chosen] = noise_scores(suspect, is_noisy[where], labels[where], total, chosen)
        full = np.full(sample.size, -1, dtype=np.int8)
        full[where] = suspect
        suspects[chosen] = full
    return MethodNoiseScores(
        label=source.label,
        method=source.method,
        n_test=int(source.test.size),
        n_samples=int(rows.size),
        total_source=source.total_source,
        scores=scores,
        suspect=suspects,
    )


@reads_store
def run_noise_table(
    path: str | Path,
    config: ClusteringConfig | str = "test",
    progress: Progress | None = None,
    *,
    results: str | Path | None = None,
    methods: MethodRegistry | None = None,
    **options: Any,
) -> NoiseTable:
    """Cluster every method's per-test contributions for a test set on `config.features` and on
    the paper's signs, score both against the recording's injected label noise, and write
    `clustering/<test set>` into the results store `results` (the recording when None), where
    the methods' groups are read from. Run the methods first (`analyze`, `analyze --method
    hydra-exact --per-test K`, baselines with `--per-test K`)."""
    started = time.perf_counter()
    config = resolve_config(ClusteringConfig, config, options)
    config.validate()
    path = store_path(path)
    require_complete(open_group(path), path)
    where = results_root(path, results, create=False)
    sample, labels, is_noisy = _noise_truth(path)
    methods = methods or default_methods()
    sources = per_test_sources(where, config.test_set, methods, recording=path)
    features = list(dict.fromkeys([config.features, PAPER_FEATURES]))
    rows, skipped = [], []
    for k, source in enumerate(sources):
        if progress is not None:
            progress("clustering", k, len(sources))
        if "class-means" in features and source.test_labels is None:
            skipped.append(f"{source.label}: no test_label in its group (class-means needs it)")
            continue
        rows.append(
            score_source(source, sample, labels, is_noisy, features, config.clusters_k, config.seed)
        )
    if progress is not None:
        progress("clustering", len(sources), len(sources))
    if not rows:
        raise AnalysisError(
            f"no method has per-test contributions for test set {config.test_set!r} in "
            f"{where}; run `hydra-store analyze {path}` (or `--method hydra-exact --per-test K`) "
            "first"
        )
    name = f"{CLUSTERING_GROUP}/{group_name(config.test_set)}"
    seconds = time.perf_counter() - started
    write_result_group(where, name, _arrays(rows, features, sample), _attrs(config, rows, seconds))
    return NoiseTable(
        path=where,
        group=name,
        test_set=config.test_set,
        features=features,
        noise_rate=float(is_noisy.mean()),
        rows=rows,
        skipped=skipped,
        seconds=seconds,
    )


def _arrays(rows: list[MethodNoiseScores], features: list[str], sample: np.ndarray) -> dict:
    pair = ("method", "features")

    def table(read: Callable[[NoiseScores], float]) -> np.ndarray:
        return np.asarray([[read(r.scores[f]) for f in features] for r in rows], dtype=np.float64)

    return {
        "method": (np.asarray([r.label for r in rows], dtype=str), ("method",), {}),
        "features": (np.asarray(features, dtype=str), ("features",), {}),
        "sample": (sample, ("sample",), {}),
        "jaccard_correct": (
            table(lambda s: s.jaccard_clean),
            pair,
            {"long_name": "Jaccard index of the other group vs the correctly labelled samples"},
        ),
        "jaccard_random": (
            table(lambda s: s.jaccard_noisy),
            pair,
            {"long_name": "Jaccard index of the suspect group vs the mislabelled samples"},
        ),
        "auc": (
            np.asarray([r.scores[features[0]].auc for r in rows]),
            ("method",),
            {"long_name": "ROC AUC of -C(i) for 'is mislabelled'"},
        ),
        "precision_at_noise_rate": (
            np.asarray([r.scores[features[0]].precision_at_rate for r in rows]),
            ("method",),
            {},
        ),
        "n_test": (np.asarray([r.n_test for r in rows], dtype=np.int64), ("method",), {}),
        "n_samples": (np.asarray([r.n_samples for r in rows], dtype=np.int64), ("method",), {}),
        "suspect": (
            np.stack([np.stack([r.suspect[f] for f in features]) for r in rows]),
            ("method", "features", "sample"),
            {"long_name": "1 suspect, 0 not, -1 not covered by the method"},
        ),
    }


def _attrs(config: ClusteringConfig, rows: list[MethodNoiseScores], seconds: float) -> dict:
    return {
        "config": dataclasses.asdict(config),
        "features_description": {f: FEATURES[f] for f in FEATURES},
        "total_source": {r.label: r.total_source for r in rows},
        "paper_table4": {k: list(v) for k, v in PAPER_TABLE4.items()},
        "seconds": seconds,
    }
