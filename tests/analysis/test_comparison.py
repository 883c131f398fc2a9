"""`compare` against the exact contribution, and the CLI of compare and validate."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import typer
import xarray as xr
from typer.testing import CliRunner

from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.metrics import pearson, sign_error_rate, spearman
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
    summary = run_comparison(path, "test", png=png)
    assert summary.computed_exact
    assert png.is_file() and png.stat().st_size > 1000
    assert summary.checkpoint_step.tolist() == [7, 14, 21]
    approx = summary.scores[0]
    assert 0 <= approx.sign_error < 0.5 and approx.spearman > 0.5
    # the last checkpoint of the curve is the end-of-training score
    assert summary.checkpoint_spearman[-1] == pytest.approx(approx.spearman, rel=1e-12)
    ds = xr.open_zarr(str(path), group="reverse/test/comparison")
    assert ds["sign_error"].dims == ("method",)
    assert any("paper" in line for line in summary.lines())


def test_cli_compare_and_validate(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    runner = CliRunner()
    app = make_app()
    result = runner.invoke(app, ["compare", str(path), "--no-checkpoints"])
    assert result.exit_code == 0, result.output
    assert "sign error" in result.output
    result = runner.invoke(app, ["validate", str(path), "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "hydra-exact" in result.output
    result = runner.invoke(app, ["validate", str(path), "--samples", "4", "--selection", "best"])
    assert result.exit_code == 2
    assert "--selection" in result.output


def test_cli_missing_store(tmp_path):
    result = CliRunner().invoke(make_app(), ["compare", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
    assert "no store" in result.output
