"""The `analyze` and `suspects` commands on an app built here with `register`."""

from __future__ import annotations

import shutil

import pytest
import typer
import xarray as xr
import zarr
from typer.testing import CliRunner

from hydra_store.analysis import stored as pipeline
from hydra_store_cli.analyze import register

app = typer.Typer()
register(app)
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_error(result) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_analyze_then_suspects_and_atomic_rerun(store_copy, monkeypatch):
    result = invoke("analyze", store_copy, "--top-k", "3", "--clusters-k", "50")
    assert result.exit_code == 0, result.output
    assert "written to group analysis/test" in result.output
    figures = sorted((store_copy / "analysis" / "test" / "figures").glob("*.png"))
    assert [f.name for f in figures] == ["extremes.png", "influencers.png", "interclass.png"]
    before = xr.open_zarr(str(store_copy), group="analysis/test")["total_contribution"].values

    csv = invoke("suspects", store_copy)
    assert csv.exit_code == 0
    header, first = csv.stdout.splitlines()[:2]
    assert header == "index,label,total_contribution,suspect"
    assert float(first.split(",")[2]) == pytest.approx(before.min())

    # A crash half-way through a re-run leaves the previous results readable.
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "cluster_samples", boom)
    result = invoke("analyze", store_copy, "--no-figures")
    assert result.exit_code != 0
    after = xr.open_zarr(str(store_copy), group="analysis/test")
    assert (after["total_contribution"].values == before).all()
    assert sorted(p.name for p in (store_copy / "analysis").iterdir()) == ["test", "zarr.json"]
    assert xr.open_zarr(str(store_copy))["hypergradient"].shape[0] == 1437


def snapshot(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_wrong_input_shape(store_copy):
    before = snapshot(store_copy)
    assert_one_error(invoke("analyze", store_copy, "--test-set", "synthetic:n=50,size=28,test=20"))
    assert snapshot(store_copy) == before


def test_store_still_recording(store_copy):
    zarr.open_group(store_copy, mode="r+").attrs["status"] = "recording"
    before = snapshot(store_copy)
    result = invoke("analyze", store_copy)
    assert_one_error(result)
    assert "recording" in result.output
    assert snapshot(store_copy) == before


def test_missing_store(tmp_path):
    assert_one_error(invoke("analyze", tmp_path / "nope.zarr"))
    assert_one_error(invoke("suspects", tmp_path / "nope.zarr"))
    assert not (tmp_path / "nope.zarr").exists()


def test_unknown_scheduler_address(store_copy):
    before = snapshot(store_copy)
    assert_one_error(invoke("analyze", store_copy, "--scheduler", "tcp://127.0.0.1:9"))
    assert snapshot(store_copy) == before


def test_suspects_before_analyze(digits_store, tmp_path):
    copy = tmp_path / "c.zarr"
    shutil.copytree(digits_store, copy)
    result = invoke("suspects", copy)
    assert_one_error(result)
    assert "analyze" in result.output


def test_suspects_all_methods_prints_and_writes_table_4(noisy_digits_store, tmp_path):
    copy = tmp_path / "noisy.zarr"
    shutil.copytree(noisy_digits_store, copy)
    analysed = invoke("analyze", copy, "--no-figures", "--cluster-features", "paper-signs")
    assert analysed.exit_code == 0, analysed.output
    assert "clustering on paper-signs: Jaccard correct labels" in analysed.output
    result = invoke("suspects", copy, "--all-methods", "--clusters-k", "100")
    assert result.exit_code == 0, result.output
    assert "analysis:contribution" in result.output and "MNIST, HyDRA" in result.output
    table = xr.open_zarr(str(copy), group="clustering/test")
    assert table["features"].values.tolist() == ["total", "paper-signs"]
    assert table.attrs["config"]["clusters_k"] == 100
    csv = invoke("suspects", copy)
    assert csv.exit_code == 0
    assert "clustering on paper-signs" in csv.stderr


def test_clustering_options_errors(store_copy, tmp_path):
    before = snapshot(store_copy)
    assert_one_error(invoke("analyze", store_copy, "--cluster-features", "signs"))
    assert_one_error(invoke("suspects", store_copy, "--cluster-features", "total"))
    assert_one_error(invoke("suspects", store_copy, "--all-methods", "--out", tmp_path / "x.csv"))
    assert_one_error(invoke("suspects", store_copy, "--all-methods", "--clusters-k", "0"))
    result = invoke("suspects", store_copy, "--all-methods")  # no injected noise
    assert_one_error(result)
    assert "--label-noise" in result.output
    assert snapshot(store_copy) == before
