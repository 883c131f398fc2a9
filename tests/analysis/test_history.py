"""The paper's Figure 3 (analysis/history.py): |h_exact - h| at every checkpoint of a store
recorded with `--mode both --hypergradient-history`, against the recorded arrays."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from hydra_store.analysis.history import run_history
from hydra_store.errors import AnalysisError
from hydra_store.recording.training import record_run
from tests.conftest import tiny_config


def test_history_errors_equal_the_recorded_hypergradients(tmp_path):
    path = tmp_path / "both.zarr"
    record_run(tiny_config(path, mode="both", track="12", hypergradient_history=True))
    summary = run_history(path)
    root = zarr.open_group(str(path), mode="r")
    approximate = np.asarray(root["hypergradient_history"][:], dtype=np.float64)
    exact = np.asarray(root["hypergradient_exact_history"][:], dtype=np.float64)
    expected = np.linalg.norm(exact - approximate, axis=2)
    np.testing.assert_allclose(summary.error, expected, rtol=1e-12)
    assert summary.error.shape == (4, 12)  # checkpoints 0..3 (3 epochs)
    assert np.all(summary.error[0] == 0) and np.all(summary.error[-1] > 0)
    final = np.linalg.norm(
        np.asarray(root["hypergradient_exact"][:], dtype=np.float64)
        - np.asarray(root["hypergradient"][:], dtype=np.float64),
        axis=1,
    )
    np.testing.assert_allclose(summary.error[-1], final, rtol=1e-12)
    assert summary.png.is_file() and summary.png.stat().st_size > 1000
    group = zarr.open_group(str(path), mode="r")["history/hypergradient_error"]
    np.testing.assert_allclose(group["mean_error"][:], expected.mean(axis=1), rtol=1e-12)
    assert any("written to" in line for line in summary.lines())


def test_history_needs_both_histories(digits_store):
    with pytest.raises(AnalysisError, match="--mode both --hypergradient-history"):
        run_history(digits_store)
