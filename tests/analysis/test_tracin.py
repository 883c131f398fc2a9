"""TracIn over the stored checkpoints (analysis/tracin.py) against a naive loop over the
checkpoints computed independently: full per-sample gradients and test gradients by autograd at
each stored checkpoint, weighted by the sums of the stored learning rates."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.tracin import TracInMethod, run_tracin
from hydra_store.core.gradients import per_sample_loss_gradients
from hydra_store.core.parameters import ParameterLayout
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store_cli.main import app


@pytest.fixture()
def run_copy(float64_run, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    return path


def naive_tracin(path: Path) -> np.ndarray:
    root = zarr.open_group(str(path), mode="r")
    lr = np.asarray(root["lr"][:])
    steps = np.asarray(root["checkpoint_step"][:])
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    n = int(root.attrs["n_train"])
    total = np.zeros(n)
    for k in range(1, steps.size):
        model = model_at_checkpoint(path, k)
        layout = ParameterLayout.from_model(model)
        model.zero_grad()
        outputs = model(tests.inputs.double())
        torch.nn.functional.cross_entropy(outputs, tests.targets).backward()
        u = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        g = per_sample_loss_gradients(model, layout, train.inputs, train.targets)
        total += lr[steps[k - 1] : steps[k]].sum() * (g @ u).detach().numpy() / n
    return total


def test_tracin_equals_a_naive_loop_over_checkpoints(run_copy):
    summary = run_tracin(run_copy, "test")
    expected = naive_tracin(run_copy)
    assert np.abs(summary.total - expected).max() < 1e-10 * np.abs(expected).max()
    group = zarr.open_group(str(run_copy), mode="r")["tracin/test"]
    terms = np.asarray(group["checkpoint_contribution"][:])
    assert terms.shape == (3, 200)  # 3 epochs, a checkpoint after each
    np.testing.assert_allclose(terms.sum(0), summary.total, rtol=1e-12)
    lr = np.asarray(zarr.open_group(str(run_copy), mode="r")["lr"][:])
    assert np.asarray(group["lr_sum"][:]).sum() == pytest.approx(lr.sum())
    ((label, (index, values)),) = TracInMethod().totals(run_copy, "test").items()
    assert label == "tracin (3 checkpoints)"
    np.testing.assert_array_equal(index, np.arange(200))
    np.testing.assert_array_equal(values, summary.total)


def test_cli_runs_tracin_and_refuses_a_bad_batch_size(run_copy):
    result = CliRunner().invoke(app, ["analyze", str(run_copy), "--method", "tracin"])
    assert result.exit_code == 0, result.output
    assert "TracIn over 3 checkpoints" in result.output
    bad = CliRunner().invoke(
        app, ["analyze", str(run_copy), "--method", "tracin", "--batch-size", "0"]
    )
    assert bad.exit_code == 2
    assert bad.output.strip() == "error: --batch-size must be at least 1, got 0"
