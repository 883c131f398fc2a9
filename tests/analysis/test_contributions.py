"""Contributions, totals and top-k against brute-force float64 numpy."""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from hydra_store.analysis import contributions, top_influencers, total_contributions
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.replay.recorded_run import model_at_checkpoint


def brute_force(store):
    root = xr.open_zarr(str(store))
    analysis = xr.open_zarr(str(store), group="analysis/test")
    h = root["hypergradient"].values.astype(np.float64)
    g = analysis["test_gradient"].values.astype(np.float64)
    n = int(root.attrs["n_train"])
    return root, analysis, -(h @ g.T) / n, -(h @ g.mean(axis=0)) / n


def test_stored_contributions_equal_brute_force(analysed_store):
    _, analysis, c, total = brute_force(analysed_store)
    stored = analysis["contribution"].values
    assert stored.shape == c.shape
    scale = np.abs(c).max()
    np.testing.assert_allclose(stored, c, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(
        analysis["total_contribution"].values, total, rtol=1e-9, atol=1e-9 * scale
    )
    # C(i) is the mean of C(i, j) over the test set (L_test is the mean test loss).
    np.testing.assert_allclose(c.mean(axis=1), total, rtol=1e-10, atol=1e-12)


def test_lazy_api_equals_brute_force(analysed_store):
    root, analysis, c, total = brute_force(analysed_store)
    lazy = contributions(root, analysis["test_gradient"])
    assert lazy.dims == ("sample", "test")
    assert hasattr(lazy.data, "dask")
    np.testing.assert_allclose(lazy.values, c, atol=1e-5 * np.abs(c).max())
    lazy_total = total_contributions(root, analysis["test_gradient"])
    np.testing.assert_allclose(lazy_total.values, total, rtol=1e-7, atol=1e-12)


def test_top_k_equals_brute_force(analysed_store):
    root, analysis, _, _ = brute_force(analysed_store)
    c = analysis["contribution"].values.astype(np.float64)
    sample = root["sample"].values
    k = analysis.sizes["k"]
    order = np.argsort(-c, axis=0, kind="stable")[:k].T
    np.testing.assert_allclose(
        analysis["top_helpful_contribution"].values, np.take_along_axis(c.T, order, axis=1)
    )
    # Indices may differ only between exactly tied values; compare through the values.
    got = analysis["top_helpful"].values
    position = {s: i for i, s in enumerate(sample)}
    got_values = np.array([[c[position[s], j] for s in row] for j, row in enumerate(got)])
    np.testing.assert_allclose(got_values, analysis["top_helpful_contribution"].values)
    harm = np.sort(c, axis=0)[:k].T
    np.testing.assert_allclose(analysis["top_harmful_contribution"].values, harm)
    # The lazy function agrees with what the pipeline stored.
    lazy = top_influencers(analysis["contribution"], k)
    np.testing.assert_array_equal(lazy["top_harmful"].values, analysis["top_harmful"].values)
    # Overall extremes by total contribution.
    total = analysis["total_contribution"].values
    np.testing.assert_array_equal(analysis["most_harmful"].values, sample[np.argsort(total)[:k]])
    np.testing.assert_array_equal(
        analysis["most_helpful_label"].values, root["label"].values[np.argsort(-total)[:k]]
    )


def test_test_gradient_matches_autograd(analysed_store):
    analysis = xr.open_zarr(str(analysed_store), group="analysis/test")
    model = model_at_checkpoint(analysed_store, -1)
    test = resolve_test_set(analysed_store, "test")
    for j in (0, 17):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            model(test.inputs[j : j + 1]), test.targets[j : j + 1]
        )
        loss.backward()
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
        np.testing.assert_allclose(
            analysis["test_gradient"].values[j], expected, rtol=1e-4, atol=1e-6
        )
