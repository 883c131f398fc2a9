"""The linear datamodeling score (`validate --lds`): the scoring function on synthetic
predictors, the measured subset losses against plain torch retraining, the score of exact
reverse-mode contributions on a small float64 run, and the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from hydra_store.analysis.lds import (
    _at_last_checkpoint,
    draw_subsets,
    lds_scores,
    predicted_changes,
    run_lds,
)
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.arguments import LdsConfig
from hydra_store.data.models import build_model
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.replay.recorded_run import RunInputs, load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store_cli.main import app
from tests.analysis.test_reverse import MODEL
from tests.cli.test_record import assert_one_error_line

SUBSETS = 8
EXACT = "reverse:contribution_exact"


def test_perfect_linear_predictor_scores_one_and_its_negation_minus_one():
    rng = np.random.default_rng(0)
    n_train, n_test = 40, 7
    contributions = rng.normal(size=(n_train, n_test))
    masks = draw_subsets(n_train, 12, 0.5, seed=3)
    assert masks.shape == (12, n_train) and (masks.sum(axis=1) == 20).all()
    # the measured loss is exactly the first-order model: base + sum over the left-out samples
    base = rng.normal(size=n_test)
    measured = base + (~masks).astype(float) @ contributions
    predicted = predicted_changes(contributions, np.arange(n_train), masks)
    assert np.allclose(predicted, measured - base)
    assert np.allclose(lds_scores(predicted, measured), 1.0)
    negated = predicted_changes(-contributions, np.arange(n_train), masks)
    assert np.allclose(lds_scores(negated, measured), -1.0)
    # a monotone transform of the loss changes nothing (ranks); an unrelated one scores ~0
    assert np.allclose(lds_scores(predicted, np.exp(measured)), 1.0)
    # covering only some training samples: only they enter the sum
    half = np.arange(0, n_train, 2)
    partial = predicted_changes(contributions[half], half, masks)
    assert np.allclose(partial, (~masks[:, half]).astype(float) @ contributions[half])
    # constant columns have no rank correlation
    assert np.isnan(lds_scores(np.ones((5, 1)), np.arange(5.0)[:, None])[0])


def test_subsets_are_reproducible_and_refused_when_empty():
    a, b = draw_subsets(100, 4, 0.3, seed=1), draw_subsets(100, 4, 0.3, seed=1)
    assert (a == b).all() and (a.sum(axis=1) == 30).all()
    assert not (a == draw_subsets(100, 4, 0.3, seed=2)).all()
    with pytest.raises(InvalidArgumentError, match="--lds-fraction"):
        draw_subsets(3, 4, 0.1, seed=0)
    for config, message in [
        (LdsConfig(fraction=0.0), "--lds-fraction must lie strictly between 0 and 1"),
        (LdsConfig(fraction=1.5), "--lds-fraction"),
        (LdsConfig(fraction=float("nan")), "--lds-fraction"),
        (LdsConfig(subsets=2), "--lds-subsets must be between 3"),
        (LdsConfig(subsets=10**12), "--lds-subsets must be between 3"),
        (LdsConfig(seed=-1), "--seed"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            config.validate()


def test_groups_computed_at_an_earlier_checkpoint_are_recognised():
    assert _at_last_checkpoint({"checkpoint": 3, "config": {"checkpoint": None}}, 4)
    assert _at_last_checkpoint({"config": {"checkpoint": -1}}, 4)
    assert not _at_last_checkpoint({"checkpoint": 1}, 4)
    assert not _at_last_checkpoint({"config": {"checkpoint": -2}}, 4)


def plain_torch_retraining(path, mask: np.ndarray) -> np.ndarray:
    """Retrain the stored run with torch.optim.SGD alone: the stored batches and per-step
    settings, loss weight 1 inside the subset and 0 outside (the mean over the batch's slots);
    the per-sample test losses in eval mode."""
    trajectory = Trajectory(path)
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    model = model_at_checkpoint(path, 0)
    settings = trajectory.settings(0, trajectory.n_steps)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=settings[0].lr,
        momentum=settings[0].momentum,
        weight_decay=settings[0].weight_decay,
    )
    weights = torch.as_tensor(mask, dtype=torch.float64)
    model.train()
    for batch, step in zip(trajectory.batches(0, trajectory.n_steps), settings, strict=True):
        for group in optimizer.param_groups:
            group.update(lr=step.lr, momentum=step.momentum, weight_decay=step.weight_decay)
        index = torch.as_tensor(batch, dtype=torch.int64)
        losses = torch.nn.functional.cross_entropy(
            model(train.inputs[index].double()), train.targets[index], reduction="none"
        )
        optimizer.zero_grad()
        (weights[index] * losses).mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return (
            torch.nn.functional.cross_entropy(
                model(tests.inputs.double()), tests.targets, reduction="none"
            )
            .double()
            .numpy()
        )


@pytest.fixture(scope="module")
def lds_store(float64_run, tmp_path_factory):
    """A copy of the float64 run with exact per-test contributions for 12 test samples, scored
    by LDS over 8 subsets (module-scoped: the retrainings run once)."""
    path = tmp_path_factory.mktemp("lds") / "run.zarr"
    shutil.copytree(float64_run.path, path)
    run_exact_analysis(path, "test", per_test=12)
    calls = []
    summary = run_lds(path, "test", subsets=SUBSETS, progress=lambda *a: calls.append(a))
    return path, summary, calls


def test_measured_subset_losses_equal_plain_torch_retraining(lds_store):
    path, _, _ = lds_store
    ds = xr.open_zarr(str(path), group="reverse/test/lds")
    mask = ds["subset_mask"].values[0]
    independent = plain_torch_retraining(path, mask)
    measured = ds["test_loss"].values[0]
    assert measured.shape == independent.shape == (100,)
    assert np.abs(measured - independent).max() < 1e-10 * max(1.0, np.abs(independent).max())


def test_exact_per_test_contributions_have_positive_lds(lds_store):
    path, summary, calls = lds_store
    assert calls[-1] == ("LDS retraining on subsets", SUBSETS + 1, SUBSETS + 1)
    by_method = {m.method: m for m in summary.per_test}
    exact = by_method[EXACT]
    print(f"\nLDS of exact reverse-mode C(i, j), 12 tests, {SUBSETS} subsets: {exact.mean:.3f}")
    assert exact.n_test == 12 and exact.mean > 0
    assert "reverse:contribution_approx" in by_method
    # every method with totals gets the LDS of the mean test loss, labelled as such
    labels = {t.method for t in summary.mean_loss}
    assert {"hydra-exact (reverse mode)", "hydra-approx (reverse mode)"} <= labels
    assert any("LDS of the mean test loss" in line for line in summary.lines())
    ds = xr.open_zarr(str(path), group="reverse/test/lds")
    assert ds["subset_mask"].shape == (SUBSETS, 200)
    assert ds["test_loss"].shape == (SUBSETS, 100)
    lds = ds["lds_reverse_contribution_exact"].values
    assert np.isfinite(lds[:12]).all() and np.isnan(lds[12:]).all()
    assert np.nanmean(lds) == pytest.approx(exact.mean)
    predicted = ds["predicted_reverse_contribution_exact"].values[:, :12]
    contributions = xr.open_zarr(str(path), group="reverse/test")["contribution_exact"].values
    expected = (~ds["subset_mask"].values).astype(float) @ contributions
    assert np.allclose(predicted, expected, rtol=1e-12, atol=0)
    assert ds.attrs["config"]["subsets"] == SUBSETS
    written = {m["method"]: m for m in ds.attrs["lds"]}
    assert written[EXACT]["mean"] == pytest.approx(exact.mean)
    # the retraining on the whole set reproduces the stored final weights' test losses
    assert np.all(np.isfinite(ds["test_loss_full"].values))


def test_lds_takes_the_run_in_python(lds_store, tmp_path):
    """`inputs=RunInputs(...)` reaches every retraining task: the same measured losses."""
    path = tmp_path / "inputs.zarr"
    shutil.copytree(lds_store[0], path)
    data = load_run_data(path)
    tests = resolve_test_set(path, "test")
    inputs = RunInputs(
        model=lambda: build_model(MODEL, input_shape=(1, 8, 8), n_classes=10),
        train=(data.train.inputs, data.train.targets),
        test=(tests.inputs, tests.targets),
    )
    given = run_lds(path, "test", subsets=3, inputs=inputs)
    mine = xr.open_zarr(str(path), group="reverse/test/lds")["test_loss"].values
    run_lds(path, "test", subsets=3)
    built = xr.open_zarr(str(path), group="reverse/test/lds")["test_loss"].values
    np.testing.assert_array_equal(mine, built)
    assert given.per_test and given.mean_loss


def test_lds_needs_some_method_results(float64_run, tmp_path):
    path = tmp_path / "bare.zarr"
    shutil.copytree(float64_run.path, path)
    with pytest.raises(AnalysisError, match="--method hydra-exact --per-test"):
        run_lds(path, "test", subsets=3)


def test_cli_validate_lds(lds_store, tmp_path):
    path = tmp_path / "cli.zarr"
    shutil.copytree(lds_store[0], path)
    runner = CliRunner()
    bad = runner.invoke(app, ["validate", str(path), "--lds", "--lds-fraction", "1.5"])
    assert_one_error_line(bad, "--lds-fraction must lie strictly between 0 and 1, got 1.5")
    assert bad.exit_code == 2
    zero = runner.invoke(app, ["validate", str(path), "--lds", "--lds-fraction", "0"])
    assert_one_error_line(zero, "--lds-fraction")
    lonely = runner.invoke(app, ["validate", str(path), "--lds-subsets", "4"])
    assert_one_error_line(lonely, "need --lds")
    results = tmp_path / "results.zarr"
    command = ["validate", str(path), "--lds", "--lds-subsets", "3", "--lds-fraction", "0.7"]
    # a results store holds no method's results yet: one line saying what to run first
    empty = runner.invoke(app, [*command, "--out", str(results)])
    assert_one_error_line(empty, "--method hydra-exact --per-test")
    good = runner.invoke(app, command)
    assert good.exit_code == 0, good.output
    assert EXACT in good.output and "LDS of the mean test loss" in good.output
    ds = xr.open_zarr(str(path), group="reverse/test/lds")
    assert ds["subset_mask"].shape == (3, 200) and (ds["subset_mask"].values.sum(1) == 140).all()
