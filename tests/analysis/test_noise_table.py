"""The paper's Table 4 for every method: each method's per-test contributions are read, clustered
and scored as the library does on the arrays themselves, and the table is written."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr

from hydra_store.analysis.clustering import cluster_samples, noise_scores
from hydra_store.analysis.noise_table import run_noise_table
from hydra_store.arguments import ClusteringConfig
from hydra_store.errors import AnalysisError
from hydra_store.store.groups import write_result_group


@pytest.fixture()
def noisy_with_baselines(analysed_noisy_store, tmp_path):
    """The analysed noisy store plus small synthetic per-test groups of the baselines: one
    complete (with its C(i)), one covering part of the training set and without C(i), one
    without test labels."""
    store = tmp_path / "noisy.zarr"
    shutil.copytree(analysed_noisy_store, store)
    root = xr.open_zarr(str(store))
    n = int(root.attrs["n_train"])
    rng = np.random.default_rng(5)
    test = np.arange(0, 40, 2)
    test_label = xr.open_zarr(str(store), group="analysis/test")["test_label"].values[test]
    noisy = np.zeros(n, bool)
    noisy[root["sample"].values] = root["is_noisy"].values
    values = rng.standard_normal((n, test.size)) - 0.5 * noisy[:, None]
    total = values.mean(axis=1) + 0.1 * rng.standard_normal(n)
    common = {"test": (test, ("test",), {}), "test_label": (test_label, ("test",), {})}
    write_result_group(
        store,
        "influence/test",
        {
            **common,
            "train": (np.arange(n), ("train",), {}),
            "contribution": (values, ("train", "test"), {}),
            "total_contribution": (total, ("train",), {}),
        },
        {},
    )
    part = np.arange(0, n, 2)
    write_result_group(
        store,
        "tracin/test",
        {
            **common,
            "train": (part, ("train",), {}),
            "contribution": (values[part] * 2, ("train", "test"), {}),
        },
        {},
    )
    write_result_group(
        store,
        "trak/test",
        {
            "test": (test, ("test",), {}),
            "train": (np.arange(n), ("train",), {}),
            "contribution": (-values, ("train", "test"), {}),
        },
        {},
    )
    return store, values, total, test_label


def expected_row(values, total, test_labels, train, root, features, k, seed):
    """The library's clustering and scores on the arrays, for the tracked samples."""
    sample = root["sample"].values
    keep = np.isin(train, sample)
    position = np.searchsorted(sample, train[keep])
    labels = root["label"].values[position]
    noisy = root["is_noisy"].values[position]
    out = {}
    for chosen in features:
        clusters = cluster_samples(
            xr.DataArray(values[keep], dims=("train", "test")),
            labels,
            total[keep],
            features=chosen,
            n_tests=k,
            seed=seed,
            test_labels=test_labels,
        )
        suspect = clusters["suspect"].values
        out[chosen] = (noise_scores(suspect, noisy, labels, total[keep], chosen), suspect, position)
    return out


def test_every_method_read_clustered_and_written(noisy_with_baselines):
    store, values, total, test_label = noisy_with_baselines
    root = xr.open_zarr(str(store))
    analysis = xr.open_zarr(str(store), group="analysis/test")
    table = run_noise_table(store, ClusteringConfig(clusters_k=12, seed=3))
    labels = [row.label for row in table.rows]
    assert labels == [
        "analysis:contribution",
        "influence:contribution",
        "tracin:contribution",
        "trak:contribution",
    ]
    assert table.features == ["total", "paper-signs"] and table.skipped == []
    n = int(root.attrs["n_train"])
    part = np.arange(0, n, 2)
    cases = {
        "analysis:contribution": (
            analysis["contribution"].values.astype(np.float64),
            analysis["total_contribution"].values,
            analysis["test_label"].values,
            root["sample"].values,
        ),
        "influence:contribution": (values, total, test_label, np.arange(n)),
        # No C(i) stored: the mean over its test samples.
        "tracin:contribution": (
            values[part] * 2,
            (values[part] * 2).mean(axis=1),
            test_label,
            part,
        ),
        "trak:contribution": (-values, -values.mean(axis=1), None, np.arange(n)),
    }
    group = xr.open_zarr(str(store), group="clustering/test")
    assert group.attrs["config"]["clusters_k"] == 12
    assert group["method"].values.tolist() == labels
    for m, row in enumerate(table.rows):
        expected = expected_row(*cases[row.label], root, table.features, 12, 3)
        for f, chosen in enumerate(table.features):
            scores, suspect, position = expected[chosen]
            assert row.scores[chosen] == scores, (row.label, chosen)
            assert group["jaccard_correct"].values[m, f] == scores.jaccard_clean
            assert group["jaccard_random"].values[m, f] == scores.jaccard_noisy
            stored = group["suspect"].values[m, f]
            np.testing.assert_array_equal(stored[position], suspect)
            assert np.all(np.delete(stored, position) == -1)
        assert group["auc"].values[m] == expected["total"][0].auc
        assert (
            row.n_samples == len(cases[row.label][3]) and row.n_test == cases[row.label][0].shape[1]
        )
    assert table.rows[2].total_source == "mean over its test samples"
    assert table.rows[1].total_source == "influence:total_contribution"
    # The analysis row is what `analyze` stored: C(i) alone, and the paper's signs on all tests.
    full = run_noise_table(store, ClusteringConfig(clusters_k=1000))
    first = full.rows[0]
    np.testing.assert_array_equal(first.suspect["total"], analysis["suspect"].values)
    np.testing.assert_array_equal(first.suspect["paper-signs"], analysis["sign_cluster"].values)
    lines = "\n".join(full.lines())
    assert "MNIST, HyDRA" in lines and "0.971/0.972" in lines and "analysis:contribution" in lines


def test_class_means_skips_a_method_without_test_labels(noisy_with_baselines):
    store = noisy_with_baselines[0]
    table = run_noise_table(store, "test", features="class-means", clusters_k=20)
    assert table.features == ["class-means", "paper-signs"]
    assert [row.label for row in table.rows][-1] == "tracin:contribution"
    assert table.skipped == ["trak:contribution: no test_label in its group (class-means needs it)"]


def test_errors(digits_store, analysed_store, noisy_digits_store):
    with pytest.raises(AnalysisError, match="without injected label noise"):
        run_noise_table(analysed_store)
    with pytest.raises(AnalysisError, match="no method has per-test contributions"):
        run_noise_table(noisy_digits_store)
