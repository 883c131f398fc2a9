"""Leave-one-out and finite-difference retraining through the stored trajectory."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr

from hydra_store.analysis.reverse import adjoint_contributions
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.validation import choose_samples, retrain_weighted, run_validation
from hydra_store.core.gradients import evaluate
from hydra_store.errors import InvalidArgumentError
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from tests.analysis.test_reverse import N_TRAIN, test_direction


def test_unweighted_retraining_reproduces_the_stored_weights(float64_run):
    path = float64_run.path
    trajectory = Trajectory(path)
    final = retrain_weighted(
        trajectory, model_at_checkpoint(path, 0), load_run_data(path).train, None
    )
    stored = trajectory.weights(len(trajectory.checkpoint_step) - 1)
    assert np.abs(final.numpy() - stored).max() < 1e-12


def test_central_differences_agree_with_exact_contributions(float64_run):
    """d L_test / d eps_i by retraining with eps_i = +-delta equals -N C_exact(i)."""
    path = float64_run.path
    trajectory = Trajectory(path)
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    u = test_direction(path)
    result = adjoint_contributions(trajectory, model_at_checkpoint(path, 0), train, u[None])
    delta = 1e-6
    for i in (3, 64, 150):
        losses = []
        for sign in (1.0, -1.0):
            weights = np.ones(N_TRAIN)
            weights[i] = 1.0 + N_TRAIN * sign * delta  # eps_i scales the loss by (1 + N eps_i)
            model = model_at_checkpoint(path, 0)
            retrain_weighted(trajectory, model, train, weights)
            losses.append(evaluate(model, tests.inputs, tests.targets)[0])
        derivative = (losses[0] - losses[1]) / (2 * delta)
        predicted = -N_TRAIN * result.exact[0, i]
        assert derivative == pytest.approx(predicted, rel=1e-5, abs=1e-9)
        # the Hessian-free approximation is measurably off
        assert abs(-N_TRAIN * result.approx[0, i] - derivative) > 1e-4 * abs(derivative)


def test_run_validation(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    calls = []
    summary = run_validation(
        path, "test", samples=8, selection="mixed", progress=lambda *a: calls.append(a)
    )
    assert summary.samples.size == 8
    assert calls[-1][1:] == (9, 9)
    by_method = {c.method: c for c in summary.correlations}
    assert by_method["hydra-exact (reverse mode)"].spearman > 0.3
    ds = xr.open_zarr(str(path), group="reverse/test/validation")
    assert ds["loss_change"].shape == (8,)
    assert any("Spearman" in line for line in summary.lines())


def test_choose_samples():
    exact = np.array([0.0, -5.0, 1.0, 3.0, -0.5, 0.1])
    assert choose_samples(exact, 2, "influential", 0).tolist() == [1, 3]
    mixed = choose_samples(exact, 4, "mixed", 0)
    assert {1, 3} <= set(mixed.tolist()) and mixed.size == 4
    with pytest.raises(InvalidArgumentError):
        choose_samples(exact, 7, "random", 0)
    with pytest.raises(InvalidArgumentError):
        choose_samples(exact, 2, "best", 0)
