"""Contributions C(i, j) and C(i) as lazy dask products straight from the store's chunks.

    C(i, j) = -(1/N) grad_w l(x_j, y_j; w_T) . h_{T,i}      C(i) = -(1/N) grad_w L_test(w_T) . h_{T,i}

with L_test the mean test loss, so C(i) = mean_j C(i, j); N is the whole training-set size
(root attribute `n_train`). Positive means training sample i helps (docs/design.md, "The math").

Nothing here imports torch: dask workers unpickle these graphs without loading the model code.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from hydra_store.errors import AnalysisError

# The largest (test, param) block one task multiplies against a chunk of hypergradients. With
# the whole test set in one block every hypergradient chunk is read once (docs/design.md,
# "Measured facts": reads repeated per output block made dask 2.5x slower than numpy).
TEST_BLOCK_BYTES = 512 * 2**20


def hypergradient_variables(ds: xr.Dataset) -> list[str]:
    """The hypergradient variables of a recording: `hypergradient`, then `hypergradient_exact`."""
    names = [n for n in ("hypergradient", "hypergradient_exact") if n in ds.variables]
    if not names:
        mode = ds.attrs.get("mode")
        raise AnalysisError(
            f"this store (mode {mode!r}) holds no stored hypergradients, which this analysis "
            "needs; record with --mode approximate or exact, or use `--method hydra-exact`, "
            "which works on trajectory-only stores"
        )
    return names


def n_train(ds: xr.Dataset) -> int:
    value = ds.attrs.get("n_train")
    if value is None:
        raise AnalysisError("the recording has no root attribute 'n_train' (training-set size)")
    return int(value)


def _as_dask(array: xr.DataArray) -> da.Array:
    data = array.data
    return data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=-1)


def _check_params(hyper: xr.DataArray, test_gradients: xr.DataArray) -> None:
    """The test gradients must live in the hypergradients' space: the same second dimension
    (`param`, or a projection's) of the same width."""
    width = hyper.dims[1]
    if test_gradients.dims != ("test", width):
        raise AnalysisError(
            f"test gradients must have dims ('test', {width!r}) like the hypergradients, got "
            f"{test_gradients.dims}"
            + ("; project them with the store's projector first" if width != "param" else "")
        )
    if hyper.sizes[width] != test_gradients.sizes[width]:
        raise AnalysisError(
            f"test gradients have {test_gradients.sizes[width]} entries along {width!r}, the "
            f"hypergradients {hyper.sizes[width]}: they come from different models"
        )


def _test_block(test_gradients: da.Array) -> da.Array:
    """Rechunk the test axis into blocks of at most TEST_BLOCK_BYTES, the param axis as stored."""
    n_test, n_param = test_gradients.shape
    rows = max(1, min(n_test, TEST_BLOCK_BYTES // max(1, n_param * test_gradients.itemsize)))
    param_chunks = test_gradients.chunks[1]
    return test_gradients.rechunk((rows, param_chunks))


def contributions(
    ds: xr.Dataset, test_gradients: xr.DataArray, *, variable: str = "hypergradient"
) -> xr.DataArray:
    """C(i, j) as a lazy (sample, test) DataArray.

    Computed in the hypergradient's dtype (float32 for the approximate mode: BLAS sgemm, as a
    numpy user would); sums over it are done in float64 (see `total_contributions`).
    """
    hyper = ds[variable]
    _check_params(hyper, test_gradients)
    h = _as_dask(hyper)
    g = _test_block(_as_dask(test_gradients))
    # Align the param chunks of g with those of h so the product is blockwise.
    g = g.rechunk((g.chunks[0], h.chunks[1]))
    scale = np.asarray(-1.0 / n_train(ds), dtype=np.result_type(h.dtype, g.dtype))
    product = da.matmul(h, (g * scale).T)
    coords = {"sample": ds["sample"]} if "sample" in ds.coords else {}
    if "test" in test_gradients.coords:
        coords["test"] = test_gradients["test"]
    return xr.DataArray(
        product,
        dims=("sample", "test"),
        coords=coords,
        name="contribution",
        attrs={"long_name": "C(i, j): contribution of training sample i to test sample j"},
    )


def mean_test_gradient(test_gradients: xr.DataArray) -> xr.DataArray:
    """grad_w L_test(w_T), L_test the mean test loss, in float64."""
    return xr.DataArray(
        _as_dask(test_gradients).mean(axis=0, dtype=np.float64), dims=test_gradients.dims[1:]
    )


def total_contributions(
    ds: xr.Dataset, test_gradients: xr.DataArray, *, variable: str = "hypergradient"
) -> xr.DataArray:
    """C(i) against the mean test loss, as a lazy (sample) float64 DataArray; equals the mean of
    `contributions` over the test axis, but needs one matrix-vector product, not a matrix one."""
    hyper = ds[variable]
    _check_params(hyper, test_gradients)
    h = _as_dask(hyper)
    gbar = mean_test_gradient(test_gradients).data.rechunk((h.chunks[1],))
    total = da.matmul(h, gbar) * (-1.0 / n_train(ds))
    coords = {"sample": ds["sample"]} if "sample" in ds.coords else {}
    return xr.DataArray(
        total,
        dims=("sample",),
        coords=coords,
        name="total_contribution",
        attrs={"long_name": "C(i): contribution of training sample i to the mean test loss"},
    )
