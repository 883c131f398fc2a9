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
from hydra_store.arguments import TracInConfig
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


def autograd_gradients(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    """Each sample's loss gradient by its own backward pass, (n, P)."""
    rows = []
    for x, y in zip(inputs.double(), targets, strict=True):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def brute_tracin_per_test(path: Path, last: int) -> np.ndarray:
    """(1/N) sum_{k <= last} L_k g_i(w_k) . g_j(w_k) for every training sample i and every
    test sample j, all gradients by per-sample backward passes: (N, T)."""
    root = zarr.open_group(str(path), mode="r")
    lr = np.asarray(root["lr"][:])
    steps = np.asarray(root["checkpoint_step"][:])
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    n = int(root.attrs["n_train"])
    out = np.zeros((n, len(tests.targets)))
    for k in range(1, last + 1):
        model = model_at_checkpoint(path, k)
        g = autograd_gradients(model, train.inputs, train.targets)
        g_test = autograd_gradients(model, tests.inputs, tests.targets)
        out += lr[steps[k - 1] : steps[k]].sum() * (g @ g_test.T).numpy() / n
    return out


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


def test_tracin_at_a_checkpoint_and_per_test_equal_brute_force(run_copy):
    """Up to checkpoint 2 of 3, for every test sample: C(i, j) equals a brute-force loop over
    checkpoints 1 and 2 with per-sample autograd gradients, its test mean is C(i), and
    `totals_at` gives the running sums over checkpoints without writing."""
    summary = run_tracin(run_copy, "test", checkpoint=2, per_test=100)
    expected = brute_tracin_per_test(run_copy, 2)
    assert np.abs(summary.per_test - expected).max() < 1e-10 * np.abs(expected).max()
    assert np.abs(summary.total - expected.mean(1)).max() < 1e-10 * np.abs(summary.total).max()
    group = zarr.open_group(str(run_copy), mode="r")["tracin/test"]
    assert group["checkpoint_contribution"].shape == (2, 200)
    assert group["contribution"].metadata.dimension_names == ("train", "test")
    np.testing.assert_array_equal(group["test"][:], np.arange(100))
    assert (group.attrs["checkpoint"], group.attrs["n_checkpoints"]) == (2, 4)
    assert TracInMethod().totals(run_copy, "test") == {}  # not the last checkpoint

    at = TracInMethod().totals_at(run_copy, [0, 2, 3], TracInConfig())
    np.testing.assert_array_equal(at[0], np.zeros(200))
    np.testing.assert_allclose(at[1], summary.total, rtol=0, atol=1e-15 * np.abs(at[1]).max())
    np.testing.assert_array_equal(at[2], run_tracin(run_copy, "test").total)


def test_cli_runs_tracin_and_refuses_a_bad_batch_size(run_copy):
    result = CliRunner().invoke(app, ["analyze", str(run_copy), "--method", "tracin"])
    assert result.exit_code == 0, result.output
    assert "TracIn over 3 checkpoints" in result.output
    result = CliRunner().invoke(
        app,
        ["analyze", str(run_copy), "--method", "tracin", "--checkpoint", "-2", "--per-test", "5"],
    )
    assert result.exit_code == 0, result.output
    assert "TracIn over 2 checkpoints" in result.output
    assert "contribution for 5 test samples" in result.output
    group = zarr.open_group(str(run_copy), mode="r")["tracin/test"]
    assert group.attrs["checkpoint"] == 2 and group["contribution"].shape == (200, 5)
    bad = CliRunner().invoke(
        app, ["analyze", str(run_copy), "--method", "tracin", "--batch-size", "0"]
    )
    assert bad.exit_code == 2
    assert bad.output.strip() == "error: --batch-size must be at least 1, got 0"
