"""The TRAK-style estimator (analysis/trak.py, core/trak.py) against a naive dense computation
with the same projection: the projector as a dense matrix, full per-sample gradients, and a
dense solve."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.trak import TrakMethod, run_trak
from hydra_store.arguments import TrakConfig
from hydra_store.core.gradients import mean_loss_gradient, per_sample_loss_gradients
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.projection import TensorSketchProjector
from hydra_store.core.trak import trak_projector
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store_cli.main import app


@pytest.fixture()
def run_copy(float64_run, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    return path


def dense_trak(
    path: Path, width: int | None, damping: float, seed: int = 0, checkpoint: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """(C(i) (N,), C(i, j) for every test sample (N, T)) at the weights of `checkpoint`: the
    projector as a dense matrix, full per-sample gradients (test ones each by its own backward
    pass) and a dense solve."""
    model = model_at_checkpoint(path, checkpoint)
    layout = ParameterLayout.from_model(model)
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    n_params = layout.n_params
    if width is None:
        projection = np.eye(n_params)
    else:
        projector = trak_projector(model, width, seed)
        assert isinstance(projector, TensorSketchProjector)
        projection = projector.project(torch.eye(n_params, dtype=torch.float64)).numpy()
    g = per_sample_loss_gradients(model, layout, train.inputs, train.targets).detach().numpy()
    u = mean_loss_gradient(model, layout, tests.inputs, tests.targets)[0].numpy()
    g_test = []
    for x, y in zip(tests.inputs.double(), tests.targets, strict=True):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[None]), y[None]).backward()
        g_test.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy())
    phi, phi_u, phi_test = g @ projection, u @ projection, np.stack(g_test) @ projection
    n = g.shape[0]
    kernel = phi.T @ phi / n + damping * np.eye(phi.shape[1])
    return phi @ np.linalg.solve(kernel, phi_u) / n, phi @ np.linalg.solve(kernel, phi_test.T) / n


@pytest.mark.parametrize(("width", "damping"), [(64, 0.01), (None, 0.1)])
def test_trak_equals_a_dense_computation(run_copy, width, damping):
    options = {"project_dim": width, "damping": damping, "batch_size": 64}
    summary = run_trak(run_copy, "test", **options)
    expected, _ = dense_trak(run_copy, width, damping)
    assert np.abs(summary.total - expected).max() < 1e-9 * np.abs(expected).max()
    assert summary.width == (width or 910)
    ((label, (_, values)),) = TrakMethod().totals(run_copy, "test").items()
    assert label == f"trak-style (K={width or 910}, damping {damping:g})"
    np.testing.assert_array_equal(values, summary.total)


def test_trak_at_a_checkpoint_and_per_test_equal_a_dense_computation(run_copy):
    """At checkpoint 1 of 3, for every test sample: C(i, j) equals the dense computation there,
    and its test mean is C(i); `totals_at` gives the same C(i) without writing."""
    summary = run_trak(run_copy, "test", project_dim=64, checkpoint=1, per_test=100)
    total, per_test = dense_trak(run_copy, 64, 0.01, checkpoint=1)
    assert (summary.checkpoint, summary.step) == (1, 7)
    assert np.abs(summary.total - total).max() < 1e-9 * np.abs(total).max()
    assert np.abs(summary.per_test - per_test).max() < 1e-9 * np.abs(per_test).max()
    mean = summary.per_test.mean(axis=1)
    assert np.abs(mean - summary.total).max() < 1e-12 * np.abs(total).max()
    group = zarr.open_group(str(run_copy), mode="r")["trak/test"]
    assert group["contribution"].metadata.dimension_names == ("train", "test")
    assert group["contribution"].dtype == np.float64
    assert group.attrs["checkpoint"] == 1
    assert TrakMethod().totals(run_copy, "test") == {}  # not the last checkpoint
    at = TrakMethod().totals_at(run_copy, [1], TrakConfig(project_dim=64))
    np.testing.assert_array_equal(at[0], summary.total)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--project-dim", "0"], "--project-dim must be at least 1, got 0"),
        (["--damping", "0"], "--damping must be a number > 0, got 0.0"),
    ],
)
def test_cli_bad_options_are_one_error_line(digits_store, options, message):
    result = CliRunner().invoke(app, ["analyze", str(digits_store), "--method", "trak", *options])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"
