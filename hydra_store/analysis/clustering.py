"""Finding mislabelled training samples by clustering their contributions (the paper's Table 4),
and the noisy-label detection figures.

Per training class (the label used in training), every sample gets a feature vector built from
its contributions C(i, j) (`FEATURES`), the samples are split into two groups with k-means, and
the group whose samples hurt more (lower mean total contribution C(i)) is `suspect`.

- `total` (the default): C(i) alone, one number per sample; two-means in one dimension is a
  threshold between the two groups' means.
- `paper-signs` (the paper's): sign(C(i, j)) ∈ {+1, -1} for K test samples drawn at random.
- `median-signs`: the same signs taken against each test sample's median over the class instead
  of 0.
- `class-means`: the mean of C(i, j) over the drawn test samples of each test class, each row
  scaled to unit length.

Why `total` is the default, and why the paper's signs stay near a Jaccard index of 0.5 on digits
(most signs belong to test samples of other classes, and carry no trace of the noise):
docs/analysis.md, "Finding mislabelled samples".
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score

from hydra_store.errors import AnalysisError

# The names are arguments.CLUSTER_FEATURES, in the same order (the first is the default); this
# module does not import arguments, whose device check may load torch.
FEATURES: dict[str, str] = {
    "total": "C(i) alone: two-means on the contribution to the whole test set",
    "paper-signs": "the paper's: signs of C(i, j) for K drawn test samples",
    "median-signs": "signs of C(i, j) against each test sample's median over the class",
    "class-means": "mean C(i, j) over each test class, each row scaled to unit length",
}
DEFAULT_FEATURES = next(iter(FEATURES))
PAPER_FEATURES = "paper-signs"
# Features read from the per-test contributions (the others need only C(i)).
PER_TEST_FEATURES = ("paper-signs", "median-signs", "class-means")


def check_features(features: str) -> str:
    """`features` if it names one of `FEATURES`, else AnalysisError naming them."""
    if features not in FEATURES:
        raise AnalysisError(
            f"unknown clustering features {features!r}; choose one of {', '.join(FEATURES)}"
        )
    return features


def draw_tests(n_test: int, k: int, seed: int) -> np.ndarray:
    """K test positions drawn without replacement (all of them if fewer), sorted."""
    if k < 1:
        raise AnalysisError(f"the number of test samples for clustering must be >= 1, got {k}")
    if k >= n_test:
        return np.arange(n_test, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=k, replace=False)).astype(np.int64)


def class_features(
    features: str,
    block: np.ndarray | None,
    total: np.ndarray,
    test_labels: np.ndarray | None = None,
) -> np.ndarray:
    """The (members, d) feature matrix of one training class.

    `block`: the class's C(i, j) at the drawn test samples (members, K), None for `total`;
    `total`: the members' C(i); `test_labels`: the labels of the drawn test samples (for
    `class-means`, whose columns are the test classes present, in increasing order)."""
    check_features(features)
    total = np.asarray(total, dtype=np.float64)
    if features == "total":
        return total[:, None]
    if block is None:
        raise AnalysisError(f"clustering features {features!r} need the per-test contributions")
    block = np.asarray(block, dtype=np.float64)
    if features == "paper-signs":
        return np.where(block > 0, 1.0, -1.0)
    if features == "median-signs":
        return np.where(block > np.median(block, axis=0), 1.0, -1.0)
    if test_labels is None:
        raise AnalysisError("clustering features 'class-means' need the test samples' labels")
    test_labels = np.asarray(test_labels)
    if test_labels.shape != (block.shape[1],):
        raise AnalysisError("class-means: one test label per drawn test sample is needed")
    means = np.stack([block[:, test_labels == c].mean(axis=1) for c in np.unique(test_labels)], 1)
    norms = np.linalg.norm(means, axis=1, keepdims=True)
    return np.divide(means, norms, out=np.zeros_like(means), where=norms > 0)


def split_two(features: np.ndarray, seed: int) -> np.ndarray:
    """Two-means labels (0/1) of the rows; all 0 when there is nothing to split (fewer than two
    rows, or fewer than two distinct rows)."""
    n = features.shape[0]
    if n < 2 or np.all(features == features[0]):
        return np.zeros(n, dtype=np.int64)
    model = KMeans(n_clusters=2, n_init=4, random_state=seed)
    return model.fit_predict(features).astype(np.int64)


def suspect_group(groups: np.ndarray, total: np.ndarray) -> np.ndarray:
    """True for the members of the group with the lower mean C(i); none when there is one group."""
    if not np.any(groups == 1) or not np.any(groups == 0):
        return np.zeros(groups.shape, dtype=bool)
    means = [total[groups == g].mean() for g in (0, 1)]
    return groups == int(np.argmin(means))


def _sample_dim(contribution: xr.DataArray) -> str:
    if contribution.ndim != 2 or contribution.dims[1] != "test":
        raise AnalysisError(
            f"contribution must have dims (sample, test) or (train, test), got {contribution.dims}"
        )
    if contribution.dims[0] not in ("sample", "train"):
        raise AnalysisError(
            f"contribution must have dims (sample, test) or (train, test), got {contribution.dims}"
        )
    return str(contribution.dims[0])


def cluster_samples(
    contribution: xr.DataArray | None,
    labels: np.ndarray | xr.DataArray,
    total: np.ndarray | xr.DataArray,
    *,
    features: str = DEFAULT_FEATURES,
    n_tests: int = 1000,
    seed: int = 0,
    test_labels: np.ndarray | None = None,
) -> xr.Dataset:
    """Split every training class in two on the chosen features; the group with the lower mean
    C(i) is suspect.

    `contribution`: C(i, j) with dims (sample, test) or (train, test), rows in the order of
    `labels` and `total` (None is enough for `total`); `test_labels`: the label of every column
    (for `class-means`). Returns a Dataset with `cluster` (1 for the suspect group of the sample's
    class, else 0) int8, `suspect` bool, and `cluster_test`, the test positions drawn. Reads the
    contributions class by class, so memory holds one class's (members, K) block."""
    check_features(features)
    labels = np.asarray(labels, dtype=np.int64)
    total = np.asarray(total, dtype=np.float64)
    if labels.ndim != 1 or total.shape != labels.shape:
        raise AnalysisError("labels and total contributions must have one value per sample")
    data, coords, dim = None, {}, "sample"
    drawn = np.zeros(0, dtype=np.int64)
    if features in PER_TEST_FEATURES:
        if contribution is None:
            raise AnalysisError(f"clustering features {features!r} need the per-test contributions")
        dim = _sample_dim(contribution)
        if contribution.shape[0] != labels.size:
            raise AnalysisError("labels and total contributions must have one value per sample")
        drawn = draw_tests(contribution.shape[1], n_tests, seed)
        data = contribution.data
        if not isinstance(data, da.Array):
            data = da.from_array(np.asarray(data), chunks=-1)
        if test_labels is not None:
            test_labels = np.asarray(test_labels)
            if test_labels.shape != (contribution.shape[1],):
                raise AnalysisError("test_labels must have one label per test sample")
            test_labels = test_labels[drawn]
        if dim in contribution.coords:
            coords = {dim: contribution[dim].values}
    elif contribution is not None:
        dim = _sample_dim(contribution)
    cluster = np.zeros(labels.size, dtype=np.int8)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        block = None if data is None else np.asarray(data[members][:, drawn].compute())
        matrix = class_features(features, block, total[members], test_labels)
        groups = split_two(matrix, seed)
        cluster[members] = suspect_group(groups, total[members]).astype(np.int8)
    return xr.Dataset(
        {
            "cluster": xr.DataArray(cluster, dims=(dim,)),
            "suspect": xr.DataArray(cluster == 1, dims=(dim,)),
            "cluster_test": xr.DataArray(drawn, dims=("cluster_test",)),
        },
        coords=coords,
    )


def sign_clusters(
    contribution: xr.DataArray,
    labels: np.ndarray | xr.DataArray,
    total: np.ndarray | xr.DataArray,
    *,
    n_tests: int = 1000,
    seed: int = 0,
) -> xr.Dataset:
    """The paper's sign clustering: `cluster_samples` with `paper-signs`, the cluster also named
    `sign_cluster`."""
    clusters = cluster_samples(
        contribution, labels, total, features=PAPER_FEATURES, n_tests=n_tests, seed=seed
    )
    return clusters.assign(sign_cluster=clusters["cluster"])


@dataclass(frozen=True)
class NoiseScores:
    """How well the analysis finds injected label noise."""

    jaccard_noisy: float  # suspect group vs the truly mislabelled, averaged over classes
    jaccard_clean: float  # the other group vs the correctly labelled, averaged over classes
    auc: float  # ROC AUC of -C(i) as a score for "is mislabelled"
    precision_at_rate: float  # fraction mislabelled among the r*n most harmful (r: noise rate)
    noise_rate: float
    features: str = DEFAULT_FEATURES  # the clustering features the suspects came from

    @property
    def jaccard(self) -> float:
        return 0.5 * (self.jaccard_noisy + self.jaccard_clean)

    def to_attrs(self) -> dict[str, float | str]:
        return {
            "jaccard_noisy": self.jaccard_noisy,
            "jaccard_clean": self.jaccard_clean,
            "jaccard": self.jaccard,
            "auc": self.auc,
            "precision_at_noise_rate": self.precision_at_rate,
            "noise_rate": self.noise_rate,
            "features": self.features,
        }


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def noise_scores(
    suspect: np.ndarray,
    is_noisy: np.ndarray,
    labels: np.ndarray,
    total: np.ndarray,
    features: str = DEFAULT_FEATURES,
) -> NoiseScores:
    """Jaccard indices per class averaged over classes (as the paper does), AUC and precision
    at the noise rate of ranking by total contribution (most harmful first)."""
    suspect = np.asarray(suspect, dtype=bool)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    labels = np.asarray(labels)
    total = np.asarray(total, dtype=np.float64)
    if not suspect.shape == is_noisy.shape == labels.shape == total.shape or suspect.ndim != 1:
        raise AnalysisError(
            "suspect, is_noisy, labels and total contributions must have one value per sample"
        )
    noisy_j, clean_j = [], []
    for label in np.unique(labels):
        m = labels == label
        noisy_j.append(_jaccard(suspect[m], is_noisy[m]))
        clean_j.append(_jaccard(~suspect[m], ~is_noisy[m]))
    rate = float(is_noisy.mean()) if is_noisy.size else 0.0
    if 0 < is_noisy.sum() < is_noisy.size:
        auc = float(roc_auc_score(is_noisy, -total))
    else:
        auc = float("nan")
    n_top = round(rate * total.size)
    top = np.argsort(total, kind="stable")[:n_top]
    precision = float(is_noisy[top].mean()) if n_top else float("nan")
    return NoiseScores(
        jaccard_noisy=float(np.mean(noisy_j)) if noisy_j else float("nan"),
        jaccard_clean=float(np.mean(clean_j)) if clean_j else float("nan"),
        auc=auc,
        precision_at_rate=precision,
        noise_rate=rate,
        features=features,
    )
