"""Stores on object storage: `record --out s3://...` and every analyser on the URL, against a
local S3-compatible server (moto's server mode on 127.0.0.1, started by the `s3_server`
fixture), compared with the same run on a local disk."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import s3fs
import xarray as xr
import zarr
from typer.testing import CliRunner

from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.stored import analyze, suspects
from hydra_store.analysis.validation import run_validation
from hydra_store.arguments import AnalyzeConfig, CompareConfig, RecordConfig, ValidateConfig
from hydra_store.errors import StoreExistsError, StoreNotFoundError
from hydra_store.recording.gradient_log import log_folder
from hydra_store.recording.training import record_run
from hydra_store.store.describe import describe_store
from hydra_store.store.format import check_output_path, open_dataset
from hydra_store_cli.main import app
from tests.conftest import tiny_config

runner = CliRunner()


def fs() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_a_store_on_s3_equals_the_local_one_through_every_analyser(s3_bucket, tmp_path):
    url, local = f"s3://{s3_bucket}/runs/digits.zarr", tmp_path / "digits.zarr"
    recorded = runner.invoke(app, ["record", "--epochs", "2", "--out", url])
    assert recorded.exit_code == 0, recorded.output
    assert f"recorded {url}  (status: complete)" in recorded.output
    record_run(RecordConfig(epochs=2, out=str(local)))

    remote_ds, local_ds = open_dataset(url), open_dataset(local)
    assert remote_ds.attrs["status"] == "complete"
    for name in ("hypergradient", "weights", "batch_index", "lr"):
        np.testing.assert_array_equal(remote_ds[name].values, local_ds[name].values)

    info = runner.invoke(app, ["info", url])
    assert info.exit_code == 0, info.output
    assert "status complete" in info.output and "size on disk: " in info.output

    analysed = runner.invoke(app, ["analyze", url, "--top-k", "3", "--clusters-k", "50"])
    assert analysed.exit_code == 0, analysed.output
    analyze(local, AnalyzeConfig(top_k=3, clusters_k=50))
    remote = xr.open_zarr(url, group="analysis/test")
    expected = xr.open_zarr(str(local), group="analysis/test")
    for name in ("total_contribution", "interclass", "top_helpful"):
        np.testing.assert_allclose(remote[name].values, expected[name].values, rtol=1e-6)
    figures = sorted(fs().ls(f"{s3_bucket}/runs/digits.zarr/analysis/test/figures"))
    assert [f.rsplit("/", 1)[1] for f in figures] == [
        "extremes.png",
        "influencers.png",
        "interclass.png",
    ]
    assert fs().cat(figures[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert suspects(url).rows.equals(suspects(local).rows)

    run_exact_analysis(url)
    run_exact_analysis(local)
    reverse = xr.open_zarr(url, group="reverse/test")["total_contribution_exact"].values
    np.testing.assert_allclose(
        reverse,
        xr.open_zarr(str(local), group="reverse/test")["total_contribution_exact"].values,
        rtol=1e-6,
    )
    compared = run_comparison(url, CompareConfig(every=2))
    assert compared.png is not None and fs().cat(str(compared.png))[:4] == b"\x89PNG"
    validated = run_validation(url, ValidateConfig(samples=3))
    assert validated.samples.size == 3
    group = zarr.open_group(url, mode="r")
    assert {"comparison", "validation"} <= set(dict(group["reverse/test"].groups()))


def test_rerunning_an_analysis_on_s3_replaces_its_group_and_leaves_no_staging(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/digits.zarr"
    record_run(tiny_config(url, epochs=1, track="200"))
    first = analyze(url, AnalyzeConfig(top_k=2, clusters_k=20, figures=False))
    totals = xr.open_zarr(url, group="analysis/test")["total_contribution"].values
    second = analyze(  # dask.distributed workers read the chunks from S3 themselves
        url,
        AnalyzeConfig(
            top_k=4, clusters_k=20, figures=False, scheduler="local-cluster", n_workers=1
        ),
    )
    assert first.group == second.group == "analysis/test"
    names = [p.rsplit("/", 1)[1] for p in fs().ls(f"{s3_bucket}/digits.zarr/analysis")]
    assert names == ["test", "zarr.json"]  # no `.test.partial-*` left behind
    analysed = xr.open_zarr(url, group="analysis/test")
    assert analysed["top_helpful"].shape[-1] == 4
    np.testing.assert_allclose(analysed["total_contribution"].values, totals, rtol=1e-5)
    assert "analysis: test" in "\n".join(describe_store(url))


def test_output_checks_on_s3_refuse_before_writing(s3_bucket):
    url = f"s3://{s3_bucket}/digits.zarr"
    with pytest.raises(StoreNotFoundError, match=r"bucket 'no-such-bucket' .* does not exist"):
        check_output_path("s3://no-such-bucket/run.zarr", overwrite=False)
    record_run(tiny_config(url, epochs=1, track="50"))
    before = open_dataset(url)["hypergradient"].values
    with pytest.raises(StoreExistsError, match="already exists; pass --overwrite"):
        record_run(tiny_config(url, epochs=2, track="50"))
    np.testing.assert_array_equal(open_dataset(url)["hypergradient"].values, before)
    fs().pipe(f"{s3_bucket}/notes/readme.txt", b"not a store")
    refused = runner.invoke(
        app, ["record", "--epochs", "1", "--overwrite", "--out", f"s3://{s3_bucket}/notes"]
    )
    assert refused.exit_code != 0 and "is not a hydra-store store" in refused.output
    assert fs().cat(f"{s3_bucket}/notes/readme.txt") == b"not a store"
    record_run(tiny_config(url, epochs=2, track="50", overwrite=True))
    assert open_dataset(url).sizes["epoch"] == 2


def test_a_partitioned_projected_recording_on_s3_keeps_its_log_local(s3_bucket, tmp_path):
    url, local = f"s3://{s3_bucket}/parts.zarr", tmp_path / "memory.zarr"
    options = dict(epochs=2, track="300", mode="approximate", project_dim=64)
    summary = record_run(tiny_config(url, memory_budget="40kB", **options))
    record_run(tiny_config(local, **options))
    assert summary.n_partitions >= 3
    assert not log_folder(url).parent.exists()  # the local gradient log is gone
    remote = open_dataset(url)
    assert remote.attrs["partitions"]["gradient_log"]
    np.testing.assert_allclose(
        remote["hypergradient"].values,
        open_dataset(local)["hypergradient"].values,
        rtol=1e-6,
        atol=1e-6 * float(np.abs(open_dataset(local)["hypergradient"].values).max()),
    )


def test_one_writer_at_a_time_on_object_storage(s3_bucket, digits_store, tmp_path):
    """Locks on S3 are objects created by a conditional write: a second writer is refused
    naming the holder, a stale lock (its process gone) is taken over, and the lock goes away
    with its holder."""
    import subprocess
    import sys

    from upath import UPath

    from hydra_store.store.locks import group_lock_file, hold, read_holder, store_lock_file

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    url = f"s3://{s3_bucket}/locked/digits.zarr"
    fs.put(str(digits_store), url.removeprefix("s3://"), recursive=True)
    lock = store_lock_file(UPath(url))
    assert str(lock) == f"s3://{s3_bucket}/locked/.digits.zarr.lock"
    with hold(lock, "the store"):
        assert read_holder(lock).pid == os.getpid()
        again = CliRunner().invoke(app, ["record", "--epochs", "1", "--out", url, "--overwrite"])
        assert again.exit_code == 2 and "is being written by" in again.output
        assert "Traceback" not in again.output
    assert not fs.exists(str(lock).removeprefix("s3://"))

    group = group_lock_file(UPath(url), "reverse/test")
    with hold(group, "the group"):
        busy = CliRunner().invoke(app, ["analyze", url, "--method", "hydra-exact"])
        assert busy.exit_code == 2 and "the group reverse/test" in busy.output

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    stale = {
        "pid": int(gone.stdout),
        "started": None,
        "host": __import__("socket").gethostname(),
        "command": "hydra-store analyze",
        "since": "2026-01-01 00:00:00",
    }
    fs.pipe(str(group).removeprefix("s3://"), json.dumps(stale).encode())
    taken = CliRunner().invoke(app, ["analyze", url, "--method", "hydra-exact"])
    assert taken.exit_code == 0, taken.output
    assert not fs.exists(str(group).removeprefix("s3://"))
