"""Per-sample losses other than cross-entropy, recorded with `HydraRecorder(loss=...)`: a
regression with mean squared error against autograd through the unrolled training, reverse mode
against the forward recording, and a user's loss by spec or as a bare function."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from hydra_store import RunInputs
from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.stored import analyze
from hydra_store.analysis.validation import run_validation
from hydra_store.core.parameters import ParameterLayout, set_flat_parameters
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.replay.trajectory import Trajectory
from tests.conftest import (
    record_regression_run,
    regression_data,
    regression_model,
    unrolled_final_weights,
)
from tests.user_plugins import pseudo_huber


def squared_errors(outputs, targets):
    """The independent per-sample MSE of the checks (not the library's)."""
    return ((outputs - targets) ** 2).mean(dim=1)


def test_an_mse_recording_equals_autograd_through_the_unrolled_training(tmp_path):
    store = tmp_path / "mse.zarr"
    (x, y), _, initial, h, h_exact = record_regression_run(store, loss="mse")
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["loss"] == {"spec": "mse", "classification": False}
    approx = unrolled_final_weights(
        store, regression_model(), x, y, initial, squared_errors, detach_gradients=True
    )
    assert approx.abs().max() > 1e-3
    assert (h - approx).abs().max() <= 1e-9 * approx.abs().max()
    exact = unrolled_final_weights(
        store, regression_model(), x, y, initial, squared_errors, detach_gradients=False
    )
    assert (h_exact - exact).abs().max() <= 1e-9 * exact.abs().max()
    assert (h - exact).abs().max() > 1e-4 * exact.abs().max()  # the two do differ


def final_model(store) -> torch.nn.Module:
    model = regression_model()
    layout = ParameterLayout.from_model(model)
    weights = torch.from_numpy(np.asarray(zarr.open_group(store, mode="r")["weights"][-1]))
    set_flat_parameters(model, layout, weights)
    return model


def forward_contributions(store, h, test, sample_loss):
    """C(i) = -(1/N) u . h_i with u the mean test-loss gradient at w_T (autograd)."""
    model = final_model(store)
    x_test, y_test = test
    loss = sample_loss(model(x_test), y_test).mean()
    params = list(model.parameters())
    u = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    return (-(h @ u) / h.shape[0]).detach().numpy()


def test_reverse_mode_on_a_regression_run_equals_the_forward_recording(tmp_path):
    store = tmp_path / "mse.zarr"
    train, test, _, h, h_exact = record_regression_run(store, loss="mse")
    inputs = RunInputs(model=regression_model, train=train, test=test)
    summary = run_exact_analysis(store, inputs=inputs)
    expected_exact = forward_contributions(store, h_exact, test, squared_errors)
    expected_approx = forward_contributions(store, h, test, squared_errors)
    scale = np.abs(expected_exact).max()
    assert scale > 0
    np.testing.assert_allclose(summary.total_exact, expected_exact, rtol=0, atol=1e-9 * scale)
    np.testing.assert_allclose(summary.total_approx, expected_approx, rtol=0, atol=1e-9 * scale)
    reverse = zarr.open_group(store, mode="r")["reverse/test"]
    assert "train_label" not in reverse  # regression targets are no labels
    assert reverse.attrs["test_loss"] == pytest.approx(
        float(squared_errors(final_model(store)(test[0]), test[1]).mean().detach()), rel=1e-12
    )


def test_compare_and_validate_run_on_a_regression_store_and_analyze_refuses_it(tmp_path):
    store = tmp_path / "mse.zarr"
    train, test, _, _, _ = record_regression_run(store, loss="mse")
    inputs = RunInputs(model=regression_model(), train=train, test=test)
    compared = run_comparison(store, inputs=inputs)
    assert compared.scores[0].n_samples == 20
    assert 0.0 <= compared.scores[0].sign_error <= 1.0
    validated = run_validation(store, inputs=inputs, samples=6, selection="random")
    model = final_model(store)
    assert validated.base_loss == pytest.approx(
        float(squared_errors(model(test[0]), test[1]).mean().detach()), rel=1e-10
    )
    assert np.all(np.isfinite(validated.loss_change)) and validated.loss_change.size == 6
    with pytest.raises(AnalysisError, match="regression loss \\(mse\\)"):
        analyze(store, inputs=inputs)


def test_a_user_loss_by_spec_is_stored_and_rebuilt_by_replay(tmp_path):
    store = tmp_path / "huber.zarr"
    train, test, _, _, h_exact = record_regression_run(
        store, loss="tests.user_plugins:pseudo_huber"
    )
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["loss"] == {"spec": "tests.user_plugins:pseudo_huber", "classification": False}
    assert Trajectory(store).loss.function is pseudo_huber
    summary = run_exact_analysis(store, inputs=RunInputs(regression_model, train, test))
    expected = forward_contributions(store, h_exact, test, pseudo_huber)
    np.testing.assert_allclose(
        summary.total_exact, expected, rtol=0, atol=1e-9 * np.abs(expected).max()
    )


def test_a_bare_importable_function_is_stored_by_its_import_name(tmp_path):
    store = tmp_path / "fn.zarr"
    record_regression_run(store, loss=pseudo_huber, epochs=1)
    attrs = zarr.open_group(store, mode="r").attrs
    assert attrs["loss"]["spec"] == "tests.user_plugins:pseudo_huber"


def test_a_loss_without_an_import_name_must_be_passed_to_the_analysers(tmp_path):
    store = tmp_path / "lambda.zarr"

    def local_loss(outputs, targets):
        return (outputs - targets).abs().sum(dim=1)

    train, test, _, _, _ = record_regression_run(store, loss=local_loss, mode="approximate")
    assert zarr.open_group(store, mode="r").attrs["loss"] == {
        "spec": None,
        "classification": False,
    }
    with pytest.raises(InvalidArgumentError, match="no import name; pass the same function"):
        run_exact_analysis(store, inputs=RunInputs(regression_model, train, test))
    with pytest.raises(InvalidArgumentError, match="given is a classification loss; the store"):
        Trajectory(store, loss="cross-entropy")
    summary = run_exact_analysis(store, inputs=RunInputs(regression_model, train, test, local_loss))
    assert np.isfinite(summary.total_exact).all()


def test_a_loss_other_than_the_recorded_one_is_refused(tmp_path):
    store = tmp_path / "mse.zarr"
    record_regression_run(store, loss="mse", mode="approximate", epochs=1)
    with pytest.raises(InvalidArgumentError, match="recorded with the loss 'mse', not 'cross-e"):
        Trajectory(store, loss="cross-entropy")


def test_unknown_losses_are_refused_before_anything_is_written(tmp_path):
    model = regression_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    from hydra_store import HydraRecorder

    with pytest.raises(InvalidArgumentError, match="unknown loss 'hinge'"):
        HydraRecorder(model, optimizer, tmp_path / "x.zarr", n_train=4, loss="hinge")
    with pytest.raises(InvalidArgumentError, match="cannot import module 'no_such_module'"):
        HydraRecorder(model, optimizer, tmp_path / "x.zarr", n_train=4, loss="no_such_module:f")
    assert not (tmp_path / "x.zarr").exists()
    (x, y), _ = regression_data()
    assert x.shape == (20, 3) and y.shape == (20, 1)
