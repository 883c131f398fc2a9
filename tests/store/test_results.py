"""Results stores (`--out` of analyze, compare and validate): the recording is only read, the
results equal those written into the recording, and a results store is tied to its recording."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from hydra_store.analysis.stored import suspects
from hydra_store_cli.main import app

runner = CliRunner()


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time (ns)."""
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            stat = os.stat(path)
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_every_analyser_writes_to_the_results_store_and_never_into_the_recording(
    digits_store, tmp_path
):
    recording = tmp_path / "recording.zarr"
    shutil.copytree(digits_store, recording)
    in_place = tmp_path / "in-place.zarr"
    shutil.copytree(digits_store, in_place)
    results = tmp_path / "results.zarr"
    before = snapshot(recording)

    analysed = invoke("analyze", recording, "--out", results, "--clusters-k", "50")
    assert f"open with: xr.open_zarr('{results}'" in analysed.output
    invoke("analyze", recording, "--out", results, "--method", "hydra-exact", "--per-test", "2")
    invoke("compare", recording, "--out", results)
    invoke("validate", recording, "--out", results, "--samples", "3")
    assert snapshot(recording) == before, "the recording was written to"

    invoke("analyze", in_place, "--clusters-k", "50", "--no-figures")
    invoke("compare", in_place)
    invoke("validate", in_place, "--samples", "3")
    for group, variable in (
        ("analysis/test", "total_contribution"),
        ("reverse/test", "total_contribution_exact"),
        ("reverse/test/validation", "loss_change"),
        ("reverse/test/comparison", "spearman"),
    ):
        mine = xr.open_zarr(str(results), group=group)[variable].values
        theirs = xr.open_zarr(str(in_place), group=group)[variable].values
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, err_msg=group)
    assert (results / "analysis" / "test" / "figures" / "influencers.png").is_file()
    assert (tmp_path / "results-compare-test.png").is_file()  # beside the results store

    table = suspects(recording, "test", results)
    reference = suspects(in_place, "test")
    np.testing.assert_array_equal(table.rows["index"].values, reference.rows["index"].values)
    listed = invoke("suspects", recording, "--results", results)
    assert listed.output.splitlines()[0].startswith("index,label,total_contribution")
    attrs = zarr.open_group(results, mode="r").attrs["hydra_store_results"]["recording"]
    assert attrs["path"] == str(recording) and attrs["n_train"] == 1437
    assert snapshot(recording) == before


def test_a_results_store_is_tied_to_its_recording(digits_store, noisy_digits_store, tmp_path):
    results = tmp_path / "results.zarr"
    invoke("analyze", digits_store, "--out", results, "--method", "hydra-exact")
    other = runner.invoke(app, ["analyze", str(noisy_digits_store), "--out", str(results)])
    assert other.exit_code == 2
    assert "holds the results of another recording" in other.output
    assert "Traceback" not in other.output
    recording = runner.invoke(app, ["compare", str(digits_store), "--out", str(noisy_digits_store)])
    assert recording.exit_code == 2 and "is a recording; give --out a new path" in recording.output
    inside = runner.invoke(app, ["validate", str(digits_store), "--out", f"{digits_store}/r.zarr"])
    assert inside.exit_code == 2 and "may not lie inside the recording" in inside.output
    plain = tmp_path / "plain"
    plain.mkdir()
    refused = runner.invoke(app, ["analyze", str(digits_store), "--out", str(plain)])
    assert refused.exit_code == 2 and "is not a hydra-store results store" in refused.output
    missing = runner.invoke(
        app, ["suspects", str(digits_store), "--results", str(tmp_path / "none.zarr")]
    )
    assert missing.exit_code == 2 and "no results store at" in missing.output


def test_a_recording_on_object_storage_is_analysed_into_a_local_results_store(
    s3_bucket, digits_store, tmp_path
):
    url = f"s3://{s3_bucket}/results-test/digits.zarr"
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.put(str(digits_store), url.removeprefix("s3://"), recursive=True)
    listing = sorted(fs.find(url.removeprefix("s3://")))
    results = tmp_path / "results.zarr"
    invoke("analyze", url, "--out", results, "--method", "hydra-exact")
    assert sorted(fs.find(url.removeprefix("s3://"))) == listing
    exact = xr.open_zarr(str(results), group="reverse/test")["total_contribution_exact"].values
    assert exact.shape == (1437,) and np.isfinite(exact).all()


@pytest.mark.parametrize("command", ["analyze", "compare", "validate"])
def test_the_recording_itself_as_out_writes_in_place(digits_store, tmp_path, command):
    recording = tmp_path / "r.zarr"
    shutil.copytree(digits_store, recording)
    extra = ["--no-figures"] if command == "analyze" else []
    extra += ["--samples", "2"] if command == "validate" else []
    invoke(command, recording, "--out", recording, *extra)
    assert "hydra_store_results" not in zarr.open_group(recording, mode="r").attrs
