"""`compare` against the exact contribution, and the CLI of compare and validate."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import typer
import xarray as xr
from typer.testing import CliRunner

from hydra_store.analysis.comparison import HYDRA_CURVE, run_comparison
from hydra_store.analysis.influence import run_influence
from hydra_store.analysis.methods import default_methods
from hydra_store.analysis.metrics import pearson, sign_error_rate, spearman
from hydra_store.analysis.reverse import adjoint_contributions, run_exact_analysis
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.tracin import run_tracin
from hydra_store.analysis.trak import run_trak
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store_cli.reverse import register


def make_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_scores():
    exact = np.array([1.0, -2.0, 3.0, -4.0])
    assert sign_error_rate(np.array([1.0, 2.0, 3.0, -4.0]), exact) == 0.25
    assert spearman(exact, 2 * exact + 1) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.0])) == pytest.approx(1.0)
    assert pearson(exact, -exact) == pytest.approx(-1.0)


def test_run_comparison(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    png = tmp_path / "curves.png"
    summary = run_comparison(path, "test", png=png, checkpoint_methods=("tracin",))
    assert summary.computed_exact
    assert png.is_file() and png.stat().st_size > 1000
    assert summary.checkpoint_step.tolist() == [7, 14, 21]
    approx = summary.scores[0]
    assert 0 <= approx.sign_error < 0.5 and approx.spearman > 0.5
    # the last checkpoint of the curve is the end-of-training score
    assert summary.checkpoint_spearman[-1] == pytest.approx(approx.spearman, rel=1e-12)
    # a method that has not run on the store is scored with its defaults
    assert summary.study.labels == [HYDRA_CURVE, "tracin"]
    assert summary.study.stored == [True, False]
    ds = xr.open_zarr(str(path), group="reverse/test/comparison")
    assert ds["sign_error"].dims == ("method",)
    assert ds["spearman_over_checkpoints"].dims == ("checkpoint_method", "checkpoint")
    assert ds["spearman_over_checkpoints"].shape == (2, 3)
    np.testing.assert_array_equal(ds["checkpoint"].values, [1, 2, 3])
    np.testing.assert_array_equal(
        ds["spearman_over_checkpoints"].values[0], ds["checkpoint_spearman"].values
    )
    assert any("paper, influence functions" in line for line in summary.lines())


def test_every_baseline_over_checkpoints(float64_run, tmp_path):
    """Influence functions, TracIn and TRAK-style over checkpoints, with the settings each last
    ran with: at the last checkpoint each curve is the end-of-training score; at checkpoint 1
    the influence curve scores what `analyze --method influence --checkpoint 1` stores against
    what `analyze --method hydra-exact --checkpoint 1` stores."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    run_influence(path, "test", solver="cg", damping=1.0, per_test=3)
    run_tracin(path, "test")
    run_trak(path, "test", project_dim=64)
    summary = run_comparison(path, "test")
    study = summary.study
    assert study.labels == [
        HYDRA_CURVE,
        "influence (cg, damping 1)",
        "tracin",
        "trak-style (K=64, damping 0.01)",
    ]
    assert study.stored == [True] * 4 and study.errors == [None] * 4
    assert study.configs[1]["per_test"] is None  # the study needs C(i) only
    table = {s.method.split(" ")[0]: s for s in summary.scores}
    for row, key in ((1, "influence"), (2, "tracin"), (3, "trak-style")):
        assert study.sign_error[row, -1] == table[key].sign_error
        assert study.spearman[row, -1] == pytest.approx(table[key].spearman, rel=1e-12)

    early = tmp_path / "checkpoint-1.zarr"
    exact = run_exact_analysis(path, "test", checkpoint=1, out=early).total_exact
    influence = run_influence(path, "test", solver="cg", damping=1.0, checkpoint=1, out=early)
    assert study.sign_error[1, 0] == sign_error_rate(influence.total, exact)
    assert study.spearman[1, 0] == pytest.approx(spearman(influence.total, exact), rel=1e-12)

    # A baseline computed before the last checkpoint is left out of compare, and said so.
    run_influence(path, "test", solver="cg", damping=1.0, checkpoint=2)
    again = run_comparison(path, "test", over_checkpoints=False)
    assert not any(s.method.startswith("influence") for s in again.scores)
    assert any(
        line.startswith("skipped influence/test: computed at checkpoint 2")
        for line in again.lines()
    )


def test_checkpoint_curves_equal_one_truncated_sweep_per_checkpoint(float64_run, tmp_path):
    """The study's one backward sweep (replaying the 21 steps once, one progress bar) stores the
    curves that one sweep truncated at each checkpoint gives, the way they were computed before:
    at checkpoints 1 and 3 (`every=2`), HyDRA's approximation and TracIn against the exact C(i)
    of `adjoint_contributions(..., checkpoint=k)` with u taken at checkpoint k."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    calls = []
    run_comparison(
        path,
        "test",
        every=2,
        checkpoint_methods=("tracin",),
        png=tmp_path / "curves.png",
        progress=lambda d, a, b: calls.append((d, a, b)),
    )
    stage = "reverse sweep, all checkpoints"
    assert [c for c in calls if c[0] == stage] == [(stage, t, 21) for t in range(1, 22)]
    ds = xr.open_zarr(str(path), group="reverse/test/comparison")
    np.testing.assert_array_equal(ds["checkpoint"].values, [1, 3])
    np.testing.assert_array_equal(ds["checkpoint_step"].values, [7, 21])
    sign_errors = ds["sign_error_over_checkpoints"].values
    correlations = ds["spearman_over_checkpoints"].values
    assert sign_errors.shape == correlations.shape == (2, 2)

    trajectory = Trajectory(path)
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    tracin = default_methods()["tracin"]
    predicted = tracin.totals_at(path, [1, 3], tracin.default_checkpoint_config("test"))
    for column, k in enumerate([1, 3]):
        model = model_at_checkpoint(path, k)
        u = mean_loss_gradient(model, trajectory.layout, tests.inputs, tests.targets)[0]
        separate = adjoint_contributions(
            trajectory, model_at_checkpoint(path, 0), train, u[None], checkpoint=k
        )
        exact = separate.exact[0]
        for row, values in enumerate((separate.approx[0], predicted[column])):
            assert sign_errors[row, column] == sign_error_rate(values, exact)
            assert correlations[row, column] == pytest.approx(spearman(values, exact), rel=1e-12)
    assert np.isfinite(correlations).all() and not np.allclose(correlations[0], correlations[1])


def test_cli_compare_and_validate(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    runner = CliRunner()
    app = make_app()
    result = runner.invoke(app, ["compare", str(path), "--no-checkpoints"])
    assert result.exit_code == 0, result.output
    assert "sign error" in result.output
    result = runner.invoke(app, ["compare", str(path), "--checkpoint-methods", "tracin"])
    assert result.exit_code == 0, result.output
    assert "  tracin (" in result.output and "defaults): 7: " in result.output
    result = runner.invoke(app, ["validate", str(path), "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "hydra-exact" in result.output
    result = runner.invoke(app, ["validate", str(path), "--samples", "4", "--selection", "best"])
    assert result.exit_code == 2
    assert "--selection" in result.output


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "hydra",
            "--checkpoint-methods: 'hydra' gives no C(i) at earlier checkpoints; choose among "
            "influence, tracin, trak, or 'none'",
        ),
        (
            "tracin,datamodels",
            "--checkpoint-methods: unknown method 'datamodels'; choose among influence, tracin, "
            "trak, or 'none'",
        ),
        (
            ",",
            "--checkpoint-methods: name methods separated by commas (e.g. influence,tracin), "
            "or 'none'",
        ),
    ],
)
def test_cli_bad_checkpoint_methods_are_one_error_line(float64_run, value, message):
    result = CliRunner().invoke(
        make_app(), ["compare", str(float64_run.path), "--checkpoint-methods", value]
    )
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"


def test_cli_missing_store(tmp_path):
    result = CliRunner().invoke(make_app(), ["compare", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
    assert "no store" in result.output
