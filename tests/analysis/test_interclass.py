"""Inter-class matrix from class means against the explicit average over all pairs."""

from __future__ import annotations

import numpy as np
import xarray as xr

from hydra_store.analysis import interclass
from hydra_store.analysis.interclass import normalise


def test_interclass_from_means_equals_average_over_pairs(analysed_store):
    root = xr.open_zarr(str(analysed_store))
    analysis = xr.open_zarr(str(analysed_store), group="analysis/test")
    h = root["hypergradient"].values.astype(np.float64)
    g = analysis["test_gradient"].values.astype(np.float64)
    c = -(h @ g.T) / int(root.attrs["n_train"])
    train_labels = root["label"].values
    test_labels = analysis["test_label"].values
    n = analysis.sizes["train_class"]
    explicit = np.full((n, n), np.nan)
    for a in range(n):
        for b in range(n):
            pairs = c[np.ix_(train_labels == a, test_labels == b)]
            if pairs.size:
                explicit[a, b] = pairs.mean()
    scale = np.nanmax(np.abs(explicit))
    np.testing.assert_allclose(analysis["interclass"].values, explicit, atol=1e-9 * scale)
    lazy = interclass(root, analysis["test_gradient"], test_labels)
    np.testing.assert_allclose(lazy["interclass"].values, explicit, atol=1e-9 * scale)
    assert list(lazy["train_class"].values) == [str(i) for i in range(10)]


def test_normalise_rule():
    m = np.array([[4.0, 1.0], [1.0, -3.0]])
    out = normalise(m)
    # row sums 5, -2; column sums 5, -2: only entry (0, 0) has both sums positive.
    assert out[0, 0] == 4.0 / np.sqrt(5 * 5)
    assert np.isnan(out[0, 1]) and np.isnan(out[1, 0]) and np.isnan(out[1, 1])
