"""One writer at a time: a recording's lock beside its store, an analysis's lock on its group,
stale locks taken over, and two real `hydra-store` processes racing for one store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from typer.testing import CliRunner

from hydra_store.analysis.stored import analyze
from hydra_store.arguments import AnalyzeConfig
from hydra_store.errors import StoreLockedError
from hydra_store.recording.training import record_run
from hydra_store.store.describe import describe_store
from hydra_store.store.locks import LockHolder, _process_start, group_lock_file, store_lock_file
from hydra_store_cli.main import app
from tests.conftest import tiny_config

runner = CliRunner()
HYDRA = str(Path(sys.executable).with_name("hydra-store"))


@pytest.fixture()
def sleeper():
    """A live process that is not this one, to hold locks."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def write_lock(lock: Path, pid: int, command: str = "hydra-store record") -> None:
    holder = LockHolder(pid, _process_start(pid), socket.gethostname(), command, "now")
    lock.write_text(json.dumps(asdict(holder)))


def test_overwrite_of_a_store_being_recorded_is_refused_and_changes_nothing(store_copy, sleeper):
    write_lock(store_lock_file(store_copy), sleeper.pid)
    before = sorted(p.name for p in store_copy.iterdir())
    result = runner.invoke(
        app, ["record", "--epochs", "1", "--overwrite", "--out", str(store_copy)]
    )
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert f"is being written by `hydra-store record` (pid {sleeper.pid}" in errors[0]
    assert sorted(p.name for p in store_copy.iterdir()) == before


def test_a_stale_lock_is_taken_over(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "run.zarr"
    write_lock(store_lock_file(out), gone.pid)
    summary = record_run(tiny_config(out, epochs=1, track="20"))
    assert zarr.open_group(summary.path, mode="r").attrs["status"] == "complete"
    assert not store_lock_file(out).exists()  # released with the final status


def test_an_analysis_holds_its_group_and_blocks_an_overwrite(store_copy, sleeper):
    lock = group_lock_file(store_copy, "analysis/test")
    zarr.open_group(store_copy, mode="r+").require_group("analysis")
    write_lock(lock, sleeper.pid, "hydra-store analyze")
    with pytest.raises(StoreLockedError, match=r"the group analysis/test .* is being written"):
        analyze(store_copy, AnalyzeConfig(figures=False, clusters_k=10))
    other = analyze(store_copy, AnalyzeConfig(test_set="digits", figures=False))
    assert other.group == "analysis/digits"  # another group is another lock
    with pytest.raises(StoreLockedError, match="refusing to replace it"):
        record_run(tiny_config(store_copy, epochs=1, overwrite=True))
    assert zarr.open_group(store_copy, mode="r").attrs["status"] == "complete"


def test_info_says_whether_a_recording_is_live_or_was_killed(store_copy, sleeper):
    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["status"] = "recording"
    assert "the recording was killed or crashed" in describe_store(store_copy)[1]
    write_lock(store_lock_file(store_copy), sleeper.pid)
    assert f"(live: `hydra-store record` (pid {sleeper.pid}" in describe_store(store_copy)[1]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [HYDRA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.parametrize("second_starts", ["together", "once the first holds the lock"])
def test_two_record_processes_on_one_store_one_proceeds(tmp_path, second_starts):
    out, solo = tmp_path / "race.zarr", tmp_path / "solo.zarr"
    # 30 epochs: the first run still holds the lock when the second has imported and tries it
    args = ["record", "--epochs", "30", "--track", "100", "--overwrite", "--out"]
    first = _start(*args, str(out))
    if second_starts != "together":
        deadline = time.monotonic() + 120
        while not store_lock_file(out).exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.05)
    second = _start(*args, str(out))
    results = [(p.wait(timeout=300), *p.communicate()) for p in (first, second)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, _, err in results if code == 2)
    assert "is being written by `hydra-store record`" in refused
    assert "Traceback" not in refused
    record_run(
        tiny_config(
            solo, model="mlp", epochs=30, track="100", lr=0.01, batch_size=64, lr_step_epochs=5
        )
    )
    raced, alone = xr.open_zarr(str(out)), xr.open_zarr(str(solo))
    assert raced.attrs["status"] == "complete"
    np.testing.assert_array_equal(raced["hypergradient"].values, alone["hypergradient"].values)
    assert not store_lock_file(out).exists()


def test_two_analyses_of_one_group_one_proceeds(store_copy):
    args = ["analyze", str(store_copy), "--clusters-k", "50"]
    processes = [_start(*args) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the second may start after the first ended
    for code, _, err in results:
        if code:
            assert "the group analysis/test" in err and "is being written by" in err
    assert xr.open_zarr(str(store_copy), group="analysis/test")["total_contribution"].size
    assert not any(p.name.startswith(".test.") for p in (store_copy / "analysis").iterdir())
    assert os.listdir(store_copy / "analysis").count("test") == 1


def test_an_unreadable_lock_is_stale_only_once_it_is_old(tmp_path):
    from hydra_store.store.locks import UNREADABLE_LOCK_AGE, hold

    lock = tmp_path / ".run.zarr.lock"
    lock.write_text("")  # as a lock file would look halfway through being written
    with (
        pytest.raises(StoreLockedError, match="being written by another process"),
        hold(lock, "the store"),
    ):
        pass
    old = time.time() - UNREADABLE_LOCK_AGE - 1
    os.utime(lock, (old, old))
    with hold(lock, "the store"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no private files left
