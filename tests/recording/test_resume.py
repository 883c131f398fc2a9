"""`record --resume`: a partitioned recording stopped after training is finished from its
undone partitions and equals the uninterrupted run; what cannot be resumed is refused. (One
stopped during training: tests/recording/test_durable.py.)"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hydra_store.recording.training import record_run
from hydra_store.store.arrays import writable
from hydra_store.store.format import consolidate
from hydra_store_cli.main import app
from tests.conftest import tiny_config

runner = CliRunner()


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "parts.zarr"
    summary = record_run(tiny_config(out, memory_budget="1MB"))
    assert summary.n_partitions >= 3
    return out


def stopped_copy(source, target, *, done_upto: int, status: str) -> zarr.Group:
    """The store as a kill during the partitions leaves it: the first partitions done, the
    others' rows never written (their chunks absent), status not complete."""
    shutil.copytree(source, target)
    group = zarr.open_group(target, mode="r+")
    rows = int(group.attrs["partitions"]["rows"])
    writable(group["partition_done"])[done_upto:] = False
    for chunk in (target / "hypergradient" / "c").iterdir():
        if int(chunk.name) * group["hypergradient"].chunks[0] >= done_upto * rows:
            shutil.rmtree(chunk)
    group.attrs["status"] = status
    if status == "failed":
        group.attrs["failure"] = "KeyboardInterrupt: "
    consolidate(target)
    return group


@pytest.mark.parametrize("status", ["recording", "failed"])
def test_resume_records_the_undone_partitions_and_equals_the_whole_run(
    partitioned, tmp_path, status
):
    target = tmp_path / "stopped.zarr"
    stopped_copy(partitioned, target, done_upto=1, status=status)
    needs = runner.invoke(app, ["analyze", str(target)])
    assert needs.exit_code == 2  # not complete: refused
    result = runner.invoke(app, ["record", "--resume", str(target)])
    assert result.exit_code == 0, result.output
    n_partitions = int(zarr.open_group(partitioned).attrs["partitions"]["count"])
    assert f"{n_partitions - 1} partitions recorded  (status: complete)" in result.output
    resumed, whole = zarr.open_group(target, mode="r"), zarr.open_group(partitioned, mode="r")
    assert resumed.attrs["status"] == "complete" and "failure" not in resumed.attrs
    np.testing.assert_array_equal(resumed["hypergradient"][:], whole["hypergradient"][:])
    assert runner.invoke(app, ["verify", "--no-replay", str(target)]).exit_code == 0


def test_what_cannot_be_resumed_is_refused_with_one_line(partitioned, tmp_path):
    # (A recording stopped during training resumes: tests/recording/test_durable.py.)
    done = runner.invoke(app, ["record", "--resume", str(partitioned)])
    assert done.exit_code == 2 and "is complete; there is nothing to resume" in done.output
    missing = runner.invoke(app, ["record", "--resume", str(tmp_path / "none.zarr")])
    assert missing.exit_code == 2 and "no store at" in missing.output
