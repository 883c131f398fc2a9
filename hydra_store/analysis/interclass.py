"""Inter-class contribution (the paper's equation 23) from class means.

    C(S_a, T_b) = 1/(|S_a||T_b|) sum_{i in S_a} sum_{j in T_b} C(i, j)
                = -(1/N) hbar_a . gbar_b

because C(i, j) is bilinear in (h_i, g_j): the average over all pairs is the product of the class
means of the hypergradients and of the test gradients. Class means are one-hot matrix products
(docs/design.md, "Measured facts": faster and leaner than groupby), so the cost is one read of the
hypergradients and a (classes, param) result, never the (sample, test) pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import dask.array as da
import numpy as np
import xarray as xr

from hydra_store.analysis.contributions import _as_dask, _check_params, n_train
from hydra_store.errors import AnalysisError


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise AnalysisError(f"labels must lie in 0..{n_classes - 1}")
    out = np.zeros((labels.size, n_classes), dtype=np.float64)
    out[np.arange(labels.size), labels] = 1.0
    return out


def class_means(data: da.Array, labels: np.ndarray, n_classes: int) -> da.Array:
    """(classes, param) float64 means of the rows of `data` by class (NaN for an empty class)."""
    hot = one_hot(labels, n_classes)
    counts = hot.sum(axis=0)
    hot_dask = da.from_array(hot.T, chunks=(n_classes, data.chunks[0]))
    sums = da.matmul(hot_dask, data.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        inverse = np.where(counts > 0, 1.0 / np.maximum(counts, 1), np.nan)
    return sums * inverse[:, None]


def normalise(matrix: np.ndarray) -> np.ndarray:
    """The paper's normalisation: entry / sqrt(row sum x column sum).

    The square root is real only when the product of the two sums is positive; an entry whose
    row sum or column sum is not positive (or not finite) is set to NaN rather than given a
    sign-flipped or infinite value (docs/analysis.md).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    cols = matrix.sum(axis=0, keepdims=True)
    valid = (rows > 0) & (cols > 0) & np.isfinite(rows) & np.isfinite(cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = matrix / np.sqrt(np.where(valid, rows * cols, np.nan))
    return np.where(valid, out, np.nan)


def interclass(
    ds: xr.Dataset,
    test_gradients: xr.DataArray,
    test_labels: np.ndarray | xr.DataArray | None = None,
    *,
    variable: str = "hypergradient",
    class_names: Sequence[str] | None = None,
) -> xr.Dataset:
    """Lazy Dataset with `interclass` (train_class, test_class) and `interclass_normalised`.

    Training classes are the labels used in training (`label`, after any injected noise); test
    classes are `test_labels`, or the `test_label` coordinate/variable of `test_gradients`.
    """
    hyper = ds[variable]
    _check_params(hyper, test_gradients)
    if test_labels is None:
        if "test_label" not in test_gradients.coords:
            raise AnalysisError("pass test_labels, or give test_gradients a test_label coordinate")
        test_labels = test_gradients["test_label"]
    test_labels = np.asarray(test_labels, dtype=np.int64)
    train_labels = np.asarray(ds["label"].values, dtype=np.int64)
    if class_names is None:
        class_names = (ds.attrs.get("dataset") or {}).get("class_names")
    n_classes = (
        len(class_names)
        if class_names is not None
        else int(max(train_labels.max(initial=0), test_labels.max(initial=0)) + 1)
    )
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    hbar = class_means(_as_dask(hyper), train_labels, n_classes)
    gbar = class_means(_as_dask(test_gradients), test_labels, n_classes)
    matrix = da.matmul(hbar, gbar.T) * (-1.0 / n_train(ds))
    normalised = da.map_blocks(normalise, matrix.rechunk(-1), dtype=np.float64)
    coords = {
        "train_class": np.asarray(names, dtype=str),
        "test_class": np.asarray(names, dtype=str),
    }
    dims = ("train_class", "test_class")
    return xr.Dataset(
        {
            "interclass": xr.DataArray(matrix, dims=dims, coords=coords),
            "interclass_normalised": xr.DataArray(normalised, dims=dims, coords=coords),
        }
    )
