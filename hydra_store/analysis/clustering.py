"""Sign clustering (the paper's Table 4) and noisy-label detection figures.

Per training class (the label used in training), each sample's feature vector is the sign of its
contributions to K randomly drawn test samples; the samples are split into two groups with
k-means, and the group whose samples hurt more (lower mean total contribution) is `suspect`.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score

from hydra_store.errors import AnalysisError


def draw_tests(n_test: int, k: int, seed: int) -> np.ndarray:
    """K test positions drawn without replacement (all of them if fewer), sorted."""
    if k < 1:
        raise AnalysisError(f"the number of test samples for sign clustering must be >= 1, got {k}")
    if k >= n_test:
        return np.arange(n_test, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_test, size=k, replace=False)).astype(np.int64)


def _split_two(features: np.ndarray, seed: int) -> np.ndarray:
    if features.shape[0] < 2:
        return np.zeros(features.shape[0], dtype=np.int64)
    if np.all(features == features[0]):
        return np.zeros(features.shape[0], dtype=np.int64)
    model = KMeans(n_clusters=2, n_init=4, random_state=seed)
    return model.fit_predict(features.astype(np.float32)).astype(np.int64)


def sign_clusters(
    contribution: xr.DataArray,
    labels: np.ndarray | xr.DataArray,
    total: np.ndarray | xr.DataArray,
    *,
    n_tests: int = 1000,
    seed: int = 0,
) -> xr.Dataset:
    """Dataset with `sign_cluster` (sample) int8: 1 for the suspect group of its class, else 0;
    `suspect` (sample) bool; and the drawn test positions `cluster_test` (cluster_test).

    Reads the contributions class by class, so memory holds one class's (samples, K) signs.
    """
    if contribution.dims != ("sample", "test"):
        raise AnalysisError(
            f"contribution must have dims ('sample', 'test'), got {contribution.dims}"
        )
    labels = np.asarray(labels, dtype=np.int64)
    total = np.asarray(total, dtype=np.float64)
    n_sample, n_test = contribution.shape
    if labels.shape != (n_sample,) or total.shape != (n_sample,):
        raise AnalysisError("labels and total contributions must have one value per sample")
    drawn = draw_tests(n_test, n_tests, seed)
    data = contribution.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    cluster = np.zeros(n_sample, dtype=np.int8)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        block = np.asarray(data[members][:, drawn].compute())
        features = np.where(block > 0, 1, -1).astype(np.int8)
        groups = _split_two(features, seed)
        means = [
            total[members[groups == g]].mean() if np.any(groups == g) else np.inf for g in (0, 1)
        ]
        suspect_group = int(np.argmin(means)) if np.any(groups == 1) else -1
        cluster[members] = (groups == suspect_group).astype(np.int8)
    coords = {"sample": contribution["sample"].values} if "sample" in contribution.coords else {}
    return xr.Dataset(
        {
            "sign_cluster": xr.DataArray(cluster, dims=("sample",)),
            "suspect": xr.DataArray(cluster == 1, dims=("sample",)),
            "cluster_test": xr.DataArray(drawn, dims=("cluster_test",)),
        },
        coords=coords,
    )


@dataclass(frozen=True)
class NoiseScores:
    """How well the analysis finds injected label noise."""

    jaccard_noisy: float  # suspect group vs the truly mislabelled, averaged over classes
    jaccard_clean: float  # the other group vs the correctly labelled, averaged over classes
    auc: float  # ROC AUC of -C(i) as a score for "is mislabelled"
    precision_at_rate: float  # fraction mislabelled among the r*n most harmful (r: noise rate)
    noise_rate: float

    @property
    def jaccard(self) -> float:
        return 0.5 * (self.jaccard_noisy + self.jaccard_clean)

    def to_attrs(self) -> dict[str, float]:
        return {
            "jaccard_noisy": self.jaccard_noisy,
            "jaccard_clean": self.jaccard_clean,
            "jaccard": self.jaccard,
            "auc": self.auc,
            "precision_at_noise_rate": self.precision_at_rate,
            "noise_rate": self.noise_rate,
        }


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def noise_scores(
    suspect: np.ndarray, is_noisy: np.ndarray, labels: np.ndarray, total: np.ndarray
) -> NoiseScores:
    """Jaccard indices per class averaged over classes (as the paper does), AUC and precision
    at the noise rate of ranking by total contribution (most harmful first)."""
    suspect = np.asarray(suspect, dtype=bool)
    is_noisy = np.asarray(is_noisy, dtype=bool)
    labels = np.asarray(labels)
    total = np.asarray(total, dtype=np.float64)
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
        jaccard_noisy=float(np.mean(noisy_j)),
        jaccard_clean=float(np.mean(clean_j)),
        auc=auc,
        precision_at_rate=precision,
        noise_rate=rate,
    )
