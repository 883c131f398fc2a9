"""Top influencers: per test sample the k most helpful and most harmful training samples, and
overall the training samples with the most extreme total contribution."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from hydra_store.errors import AnalysisError


def _lookup(block: np.ndarray, values: np.ndarray) -> np.ndarray:
    return values[block]


def top_influencers(contribution: xr.DataArray, k: int = 10) -> xr.Dataset:
    """Lazy Dataset of (test, k) variables: `top_helpful` / `top_harmful` (training-set indices,
    most extreme first) and `top_helpful_contribution` / `top_harmful_contribution`.

    Uses dask's argtopk, a chunk-wise reduction along the sample axis: only k candidates per
    chunk are kept, never the whole (sample, test) array.
    """
    if contribution.dims != ("sample", "test"):
        raise AnalysisError(
            f"contribution must have dims ('sample', 'test'), got {contribution.dims}"
        )
    n_sample = contribution.sizes["sample"]
    if k < 1:
        raise AnalysisError(f"k must be at least 1, got {k}")
    k = min(k, n_sample)
    data = contribution.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=-1)
    sample_values = (
        np.asarray(contribution["sample"].values, dtype=np.int64)
        if "sample" in contribution.coords
        else np.arange(n_sample, dtype=np.int64)
    )
    out = {}
    for name, kk in (("top_helpful", k), ("top_harmful", -k)):
        positions = da.argtopk(data, kk, axis=0)  # (k, test), most extreme first
        values = da.topk(data, kk, axis=0)
        index = positions.map_blocks(_lookup, values=sample_values, dtype=np.int64)
        out[name] = xr.DataArray(index.T, dims=("test", "k"))
        out[f"{name}_contribution"] = xr.DataArray(values.T, dims=("test", "k"))
    coords = {"k": np.arange(k, dtype=np.int64)}
    if "test" in contribution.coords:
        coords["test"] = contribution["test"].values
    return xr.Dataset(out, coords=coords)


def extreme_samples(
    total: np.ndarray, sample: np.ndarray, labels: np.ndarray, k: int = 10
) -> dict[str, dict[str, np.ndarray]]:
    """The k most helpful and k most harmful training samples by total contribution, with
    their training-set index, label and C(i). Inputs are (sample,) vectors, small enough to hold."""
    total = np.asarray(total, dtype=np.float64)
    order = np.argsort(total, kind="stable")
    k = min(k, total.size)
    picks = {"most_helpful": order[::-1][:k], "most_harmful": order[:k]}
    return {
        name: {"index": np.asarray(sample)[p], "label": np.asarray(labels)[p], "value": total[p]}
        for name, p in picks.items()
    }
