"""Influence functions (analysis/influence.py, core/influence.py), in float64: the explicit
solver equals a brute-force Hessian solve, CG and LiSSA equal it when converged, an indefinite
damped Hessian warns; on a strongly convex problem trained to convergence the influence
function predicts leave-one-out retraining to first order and equals HyDRA's exact C(i); bad
options are one error line."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hydra_store import RunInputs
from hydra_store.analysis.influence import AUTO_DAMPING_FACTOR, InfluenceMethod, run_influence
from hydra_store.analysis.methods import default_methods
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.validation import run_validation
from hydra_store.arguments import InfluenceConfig
from hydra_store.core.gradients import (
    evaluate,
    mean_loss_gradient,
    per_sample_loss_function,
    per_sample_loss_gradients,
)
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters, set_flat_parameters
from hydra_store.errors import IndefiniteHessianWarning
from hydra_store.recording.recorder import HydraRecorder
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store_cli.main import app


@pytest.fixture()
def run_copy(float64_run, tmp_path) -> Path:
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    return path


def brute_force_influence(
    path: Path, damping: float, checkpoint: int = -1, per_test: np.ndarray | None = None
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(1/N) u . (H + damping I)^{-1} g_i for every i at the weights of `checkpoint`, with H
    from torch.autograd.functional.hessian of the whole training objective (the weight decay of
    the step ending at the checkpoint) and torch.linalg.solve; with `per_test`, also (1/N) g_j .
    (H + damping I)^{-1} g_i for those test samples, each g_j by its own backward pass."""
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    model = model_at_checkpoint(path, checkpoint, dtype=torch.float64)
    layout = ParameterLayout.from_model(model)
    root = zarr.open_group(str(path), mode="r")
    step = int(root["checkpoint_step"][checkpoint])
    weight_decay = float(root["weight_decay"][step - 1])
    x, y = train.inputs.double(), train.targets
    losses = per_sample_loss_function(model, layout, x, y)

    def objective(w: torch.Tensor) -> torch.Tensor:
        return losses(w).mean() + 0.5 * weight_decay * (w @ w)

    point = get_flat_parameters(model, layout)
    hessian = torch.autograd.functional.hessian(objective, point, vectorize=True)
    damped = hessian + damping * torch.eye(point.numel(), dtype=torch.float64)
    gradients = per_sample_loss_gradients(model, layout, x, y)
    u, _ = mean_loss_gradient(model, layout, tests.inputs, tests.targets)
    solved = torch.linalg.solve(damped, gradients.T)
    total = (u @ solved / x.shape[0]).detach().numpy()
    if per_test is None:
        return total
    rows = []
    for j in per_test:
        model.zero_grad()
        output = model(tests.inputs[j : j + 1].double())
        torch.nn.functional.cross_entropy(output, tests.targets[j : j + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return total, (torch.stack(rows) @ solved / x.shape[0]).T.detach().numpy()


def relative(mine: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.abs(mine - theirs).max() / np.abs(theirs).max())


def test_explicit_equals_brute_force_and_warns_when_indefinite(run_copy):
    with pytest.warns(IndefiniteHessianWarning, match=r"negative, the smallest -0\.3"):
        small = run_influence(run_copy, "test", damping=0.01)
    assert small.inverse.negative_share > 0.05
    assert any(line.startswith("warning: the damped Hessian") for line in small.lines())
    assert relative(small.total, brute_force_influence(run_copy, 0.01)) < 1e-8
    stored = zarr.open_group(str(run_copy), mode="r")["influence/test"]
    assert stored.attrs["indefinite"] is True
    np.testing.assert_array_equal(stored["total_contribution"][:], small.total)

    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteHessianWarning)
        automatic = run_influence(run_copy, "test")
    smallest = automatic.spectrum.smallest
    assert smallest < 0 and automatic.damping == pytest.approx(-AUTO_DAMPING_FACTOR * smallest)
    assert automatic.inverse.negative_share == 0.0 and automatic.warning is None
    assert relative(automatic.total, brute_force_influence(run_copy, automatic.damping)) < 1e-10
    totals = InfluenceMethod().totals(run_copy, "test")
    label = f"influence (explicit, damping {automatic.damping:.3g})"
    np.testing.assert_array_equal(totals[label][1], automatic.total)


def test_explicit_at_a_checkpoint_and_per_test_equal_brute_force(run_copy):
    """At checkpoint 1 of 3, for every test sample: C(i, j) and C(i) equal the dense solve at
    that checkpoint's weights, and the mean of C(i, j) over the test set is C(i)."""
    summary = run_influence(run_copy, "test", checkpoint=1, per_test=100)
    assert (summary.checkpoint, summary.step) == (1, 7)
    assert summary.damping > 0 and summary.warning is None
    chosen = np.arange(100)
    total, per_test = brute_force_influence(run_copy, summary.damping, 1, chosen)
    assert relative(summary.total, total) < 1e-10
    assert relative(summary.per_test, per_test) < 1e-10
    assert relative(summary.per_test.mean(axis=1), summary.total) < 1e-12
    group = zarr.open_group(str(run_copy), mode="r")["influence/test"]
    assert group["contribution"].metadata.dimension_names == ("train", "test")
    assert group["contribution"].dtype == np.float64
    np.testing.assert_array_equal(group["test"][:], chosen)
    np.testing.assert_array_equal(group["contribution"][:], summary.per_test)
    assert (group.attrs["checkpoint"], group.attrs["n_checkpoints"]) == (1, 4)
    assert group.attrs["config"]["checkpoint"] == 1
    # Computed before the last checkpoint: compare and validate do not score it.
    assert InfluenceMethod().totals(run_copy, "test") == {}
    # The same checkpoint without writing (compare over checkpoints): the same numbers.
    config = InfluenceConfig(checkpoint=None)
    at = InfluenceMethod().totals_at(run_copy, [1, -1], config)
    np.testing.assert_array_equal(at[0], summary.total)
    np.testing.assert_array_equal(at[1], run_influence(run_copy).total)


def test_cg_and_lissa_equal_explicit_when_converged(run_copy, monkeypatch):
    # Hessian-vector products of many test samples go in blocks of rows: blocks of 2 here.
    monkeypatch.setattr("hydra_store.analysis.influence.HESSIAN_BLOCK", 2)
    chosen = (3, 17, 42)
    explicit = run_influence(run_copy, "test", damping=2.0, per_test=chosen)
    cg = run_influence(
        run_copy, "test", solver="cg", damping=2.0, cg_tolerance=1e-12, per_test=chosen
    )
    assert cg.inverse.converged and cg.inverse.iterations < 200
    assert cg.per_test_inverse.converged and cg.per_test_inverse.iterations < 200
    assert relative(cg.total, explicit.total) < 1e-9
    # one CG per test sample, side by side: each row as if solved alone
    assert relative(cg.per_test, explicit.per_test) < 1e-9
    # Full-batch minibatches make LiSSA deterministic: the Neumann series to convergence.
    lissa = run_influence(
        run_copy,
        "test",
        solver="lissa",
        damping=2.0,
        lissa_depth=150,
        lissa_repeats=1,
        lissa_batch_size=10_000,
        per_test=chosen,
    )
    assert lissa.inverse.residual < 1e-9 and lissa.per_test_inverse.residual < 1e-9
    assert relative(lissa.total, explicit.total) < 1e-8
    assert relative(lissa.per_test, explicit.per_test) < 1e-8
    # Minibatch LiSSA carries every test sample through the same minibatches, so it is linear
    # in the right-hand side: the per-test mean is the total, however far from converged.
    monkeypatch.setattr("hydra_store.analysis.influence.HESSIAN_BLOCK", 32)
    rough = run_influence(
        run_copy,
        "test",
        solver="lissa",
        damping=2.0,
        lissa_depth=20,
        lissa_repeats=2,
        lissa_batch_size=50,
        per_test=100,
    )
    assert rough.inverse.residual > 1e-3
    assert relative(rough.per_test.mean(axis=1), rough.total) < 1e-10
    # An explicit scale below the spectrum diverges, and says what to raise.
    with pytest.raises(Exception, match=r"LiSSA diverged.*raise --lissa-scale"):
        run_influence(run_copy, "test", solver="lissa", damping=2.0, lissa_scale=0.5)


# -- a strongly convex problem trained to convergence ------------------------------------------

N_CONVEX, EPOCHS, STEPS_PER_EPOCH, WEIGHT_DECAY = 200, 15, 20, 0.1


def linear_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3).double()


def convex_data():
    generator = torch.Generator().manual_seed(0)
    w_true = torch.randn(4, 3, generator=generator, dtype=torch.float64)

    def draw(n: int):
        x = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        noisy = x @ w_true + 0.7 * torch.randn(n, 3, generator=generator, dtype=torch.float64)
        return x, noisy.argmax(1)

    return draw(N_CONVEX), draw(20)


@pytest.fixture(scope="module")
def convex_run(tmp_path_factory):
    """L2-regularised softmax regression (15 parameters, 200 samples) by full-batch gradient
    descent until the gradient vanishes, around a user's loop: (store, RunInputs)."""
    path = tmp_path_factory.mktemp("convex") / "convex.zarr"
    (x, y), test = convex_data()
    model = linear_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.8, weight_decay=WEIGHT_DECAY)
    recorder = HydraRecorder(model, optimizer, path, n_train=N_CONVEX, mode="trajectory")
    with recorder:
        for _ in range(EPOCHS):
            for _ in range(STEPS_PER_EPOCH):
                recorder.step(x, y, torch.arange(N_CONVEX))
            recorder.end_epoch()
    return path, RunInputs(model=linear_model, train=(x, y), test=test)


def minimiser(weights: torch.Tensor, x, y, start: torch.Tensor) -> torch.Tensor:
    """The exact minimiser of (1/N) sum_k weights_k l_k(w) + (lambda/2)|w|^2, by Newton."""
    model = linear_model()
    layout = ParameterLayout.from_model(model)
    losses = per_sample_loss_function(model, layout, x, y)

    def objective(w: torch.Tensor) -> torch.Tensor:
        return (weights * losses(w)).sum() / N_CONVEX + 0.5 * WEIGHT_DECAY * (w @ w)

    w = start.clone()
    for _ in range(30):
        gradient = torch.autograd.functional.jacobian(objective, w)
        if float(gradient.abs().max()) < 1e-14:
            return w
        hessian = torch.autograd.functional.hessian(objective, w)
        w = w - torch.linalg.solve(hessian, gradient)
    raise AssertionError("Newton's method did not converge")


def test_influence_predicts_leave_one_out_on_a_strongly_convex_problem(convex_run):
    path, inputs = convex_run
    (x, y), (x_test, y_test) = convex_data()
    summary = run_influence(path, "test", inputs=inputs)
    assert summary.damping == 0.0 and summary.spectrum.smallest > WEIGHT_DECAY / 2  # convex
    predicted = summary.total

    model = linear_model()
    layout = ParameterLayout.from_model(model)
    trained = get_flat_parameters(model_at_checkpoint(path, -1, inputs=inputs), layout)
    optimum = minimiser(torch.ones(N_CONVEX, dtype=torch.float64), x, y, trained)
    assert float((trained - optimum).abs().max()) < 1e-9  # gradient descent converged

    def test_loss(w: torch.Tensor) -> float:
        set_flat_parameters(model, layout, w)
        return evaluate(model, x_test, y_test)[0]

    base = test_loss(optimum)
    chosen = np.arange(0, N_CONVEX, 20)
    derivative, left_out = np.zeros(N_CONVEX), np.zeros(N_CONVEX)
    for i in chosen:
        weights = torch.ones(N_CONVEX, dtype=torch.float64)
        weights[i] = 1 - 1e-5  # eps_i = -1e-5 / N: the derivative, to first order
        derivative[i] = (test_loss(minimiser(weights, x, y, optimum)) - base) / 1e-5
        weights[i] = 0.0  # left out: eps_i = -1/N
        left_out[i] = test_loss(minimiser(weights, x, y, optimum)) - base
    # C_IF(i) is the change of the test loss per unit of -N eps_i: exactly to first order ...
    assert relative(predicted[chosen], derivative[chosen]) < 1e-4
    # ... and leaving a sample out (its second-order terms, ~1/N of it) is close: measured 5.7%.
    assert relative(predicted[chosen], left_out[chosen]) < 0.1
    assert np.corrcoef(predicted[chosen], left_out[chosen])[0, 1] > 0.99

    # HyDRA's exact C(i) through the converged trajectory is the same quantity.
    exact = run_exact_analysis(path, "test", inputs=inputs).total_exact
    assert relative(predicted, exact) < 1e-6

    # Brute-force retraining through the stored steps (validate) measures the same changes.
    validation = run_validation(path, "test", samples=6, inputs=inputs, methods=default_methods())
    for i, change in zip(validation.samples, validation.loss_change, strict=True):
        weights = torch.ones(N_CONVEX, dtype=torch.float64)
        weights[i] = 0.0
        assert change == pytest.approx(test_loss(minimiser(weights, x, y, optimum)) - base)
    scored = {c.method: c for c in validation.correlations}
    assert scored["influence (explicit, damping 0)"].pearson > 0.99


# -- the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--damping", "-1"], "--damping must be a number >= 0, got -1.0"),
        (["--solver", "newton"], "--solver must be one of explicit, cg, lissa, got 'newton'"),
        (["--solver", "lissa", "--lissa-depth", "0"], "--lissa-depth must be at least 1, got 0"),
        (
            ["--solver", "lissa", "--lissa-scale", "0"],
            "--lissa-scale must be a number > 0, got 0.0",
        ),
        (["--checkpoint", "9"], "checkpoint 9 does not exist; the store has checkpoints 0..3"),
        (["--per-test", "0"], "--per-test must be at least 1, got 0"),
        (
            ["--per-test", "361"],
            "--per-test 361: the test set has 360 samples; ask for 1..360",
        ),
    ],
)
def test_cli_bad_options_are_one_error_line(digits_store, options, message):
    result = CliRunner().invoke(
        app, ["analyze", str(digits_store), "--method", "influence", *options]
    )
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {message}"], result.output


def test_cli_prints_the_indefinite_hessian_as_a_summary_line(run_copy):
    result = CliRunner().invoke(
        app, ["analyze", str(run_copy), "--method", "influence", "--solver", "cg", "--damping", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "influence functions (conjugate gradients)" in result.output
    assert "warning: the damped Hessian (damping 0) is indefinite" in result.output
    assert "IndefiniteHessianWarning" not in result.output
