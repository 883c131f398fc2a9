"""Durable points and `record --resume` of a recording stopped during training: real
`hydra-store record` processes killed with SIGKILL (where the test hook HYDRA_STORE_KILL_AT
says, or from outside at whatever point they reached), resumed, and compared array by array and
attribute by attribute with the run that was never stopped."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hydra_store.recording.durable import KILL_ENV
from hydra_store.recording.training import record_run
from hydra_store.store.locks import LockHolder, _process_start, store_lock_file
from hydra_store_cli.main import app
from tests.conftest import record_small_run, tiny_config

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]

# digits, a small MLP, 3 steps an epoch, momentum and a step decay; a durable point after every
# step (the last of an epoch's at its end): points 1-2 inside epoch 1, 3 at its end, 4-5 ...
APPROXIMATE = [
    "--model", "mlp:hidden=8", "--epochs", "3", "--lr", "0.1", "--batch-size", "512",
    "--track", "60", "--lr-step-epochs", "2", "--durable-seconds", "0",
]  # fmt: skip
EXACT = [
    "--model", "mlp:hidden=4", "--epochs", "2", "--lr", "0.1", "--batch-size", "512",
    "--track", "5", "--mode", "both", "--schedule", "plateau", "--plateau-patience", "0",
    "--hypergradient-history", "--durable-seconds", "0",
]  # fmt: skip
# A state larger than its budget: partitions after training, from a gradient log of the
# projected per-sample gradients written during training.
PARTITIONED = [
    "--model", "mlp:hidden=8", "--epochs", "2", "--lr", "0.1", "--batch-size", "512",
    "--project-dim", "32", "--memory-budget", "60KB", "--durable-seconds", "0",
]  # fmt: skip
# BatchNorm and dropout: running statistics in every checkpoint, a dropout seed per step.
BATCH_NORM = [
    "--dataset", "synthetic:n=96,channels=3,size=8,test=16", "--model", "bncnn",
    "--epochs", "2", "--batch-size", "32", "--track", "24", "--durable-seconds", "0",
]  # fmt: skip
# Attributes that say when, not what.
WHEN = {"created", "completed"}


def record(args: list[str], out: Path):
    result = runner.invoke(app, ["record", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def command(args: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "hydra_store_cli.main", "record", *args, "--out", str(out)]


def environment(**extra: str) -> dict[str, str]:
    """A child's environment with this process's torch thread count: a sum split over another
    number of threads rounds differently, and earlier tests may have changed it here (a dask
    worker in this process sets one thread)."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **extra}


def resume(out: Path, *fragments: str) -> None:
    result = runner.invoke(app, ["record", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def assert_same_store(resumed: Path, whole: Path) -> None:
    """Every integer array equal, every float array equal to 1e-6 of its largest value (the
    issue's bound on the CPU; NaN where NaN), every attribute but the times equal (and the
    configuration's `out`, the store's own path). Resumed runs are bit-equal when the killed
    process and the resuming one sum with the same number of threads; in a full test session
    that is not always so (an in-process dask worker changes torch's thread count), and a
    float32 sum split otherwise differs by an ulp."""
    a, b = zarr.open_group(resumed, mode="r"), zarr.open_group(whole, mode="r")
    assert a.attrs["status"] == "complete"
    assert sorted(n for n, _ in a.arrays()) == sorted(n for n, _ in b.arrays())
    groups = sorted(dict(a.groups()))
    assert groups == sorted(dict(b.groups()))
    assert groups in ([], ["history"])  # the paper's Figure 3 of a --mode both history run
    if groups:
        name = "history/hypergradient_error/error"
        scale = float(np.nanmax(np.abs(b[name][...])))
        np.testing.assert_allclose(a[name][...], b[name][...], rtol=0, atol=1e-6 * scale)
    for name, array in a.arrays():
        mine, theirs = array[...], b[name][...]
        assert mine.shape == theirs.shape, name
        if np.issubdtype(theirs.dtype, np.floating) and theirs.size:
            scale = float(np.nanmax(np.abs(theirs))) if np.isfinite(theirs).any() else 0.0
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6 * scale, err_msg=name)
        else:
            np.testing.assert_array_equal(mine, theirs, err_msg=name)
    attrs, expected = dict(a.attrs), dict(b.attrs)
    for key in WHEN:
        attrs.pop(key, None)
        expected.pop(key, None)
    attrs["config"].pop("out")
    expected["config"].pop("out")
    assert attrs == expected


# The killed runs: (options, where the process kills itself).
KILLS = {
    "early": (APPROXIMATE, "step:1"),
    "in-a-durable-point": (APPROXIMATE, "durable:6"),
    "in-the-final-write": (APPROXIMATE, "final:1"),
    "exact": (EXACT, "step:5"),
    "partitioned": (PARTITIONED, "durable:4"),
    "batch-norm": (BATCH_NORM, "step:5"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the uninterrupted runs, the killed ones), by name. The killed `hydra-store record`
    processes run side by side (most of each is its start: imports and data), while the
    uninterrupted runs are recorded here."""
    folder = tmp_path_factory.mktemp("durable")
    started = {}
    for name, (args, at) in KILLS.items():
        out, log = folder / f"killed-{name}.zarr", folder / f"killed-{name}.log"
        with open(log, "wb") as errors:
            process = subprocess.Popen(
                command(args, out),
                cwd=REPO,
                env=environment(**{KILL_ENV: at}),
                stdout=subprocess.DEVNULL,
                stderr=errors,
            )
        started[name] = (out, log, process)
    whole = {}
    for name, args in (
        ("approximate", APPROXIMATE),
        ("exact", EXACT),
        ("partitioned", PARTITIONED),
        ("batch-norm", BATCH_NORM),
    ):
        whole[name] = folder / f"{name}.zarr"
        record(args, whole[name])
    for _, log, process in started.values():
        process.wait(timeout=600)
        assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return whole, {name: out for name, (out, _, _) in started.items()}


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("early", "no durable point yet, so it was recorded again from the start"),
        ("in-a-durable-point", "from its durable point at step 5 (epoch 1 done)"),
        ("in-the-final-write", "from its durable point at step 9 (epoch 3 done)"),
    ],
    ids=["early", "in-a-durable-point", "in-the-final-write"],
)
def test_a_killed_recording_resumes_to_the_uninterrupted_store(runs, name, says):
    whole, killed = runs
    out = killed[name]
    group = zarr.open_group(out, mode="r")
    assert group.attrs["status"] == "recording"
    info = runner.invoke(app, ["info", str(out)]).output
    if name == "early":
        assert "no durable point yet; `hydra-store record --resume` records it again" in info
    if name == "in-a-durable-point":
        # The kill came after the 6th point's flush, before its commit (the end of epoch 2,
        # with its checkpoint): the arrays ran past the committed point, and are cut back.
        assert group.attrs["durable_point"]["step"] == 5 < group["lr"].shape[0]
        assert "continues from its durable point at step 5 (step 2 of epoch 2" in info
    resume(out, says, "(status: complete)")
    assert_same_store(out, whole["approximate"])


def test_mid_training_both_recurrences_momentum_plateau_and_history(runs):
    whole, killed = runs
    resume(killed["exact"], "from its durable point at step 4")  # killed after step 5
    assert_same_store(killed["exact"], whole["exact"])


def test_a_partitioned_recording_resumes_training_with_its_gradient_log(runs):
    whole, killed = runs
    out = killed["partitioned"]
    log = out / ".gradient-log"
    assert log.is_dir() and zarr.open_group(out, mode="r").attrs["partitions"]["count"] > 1
    resume(out, "from its durable point at step 3")
    assert not log.exists()  # deleted once every partition was recorded
    assert_same_store(out, whole["partitioned"])


def test_a_batch_norm_and_dropout_recording_resumes_to_the_uninterrupted_store(runs):
    whole, killed = runs
    resume(killed["batch-norm"], "(status: complete)")
    assert_same_store(killed["batch-norm"], whole["batch-norm"])
    group = zarr.open_group(killed["batch-norm"], mode="r")
    assert group["buffers"].shape[0] == 3 and group["step_seed"].shape[0] == 6


def test_a_kill_from_outside_resumes_and_the_store_verifies(runs, tmp_path):
    whole, _ = runs
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(
        command(APPROXIMATE, out),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                attrs = json.loads((out / "zarr.json").read_text())["attributes"]
            except (OSError, ValueError, KeyError):
                attrs = {}
            if attrs.get("durable_point", {}).get("step", 0) >= 2:
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    resume(out, "(status: complete)")
    assert_same_store(out, whole["approximate"])
    verified = runner.invoke(app, ["verify", str(out)])
    assert verified.exit_code == 0, verified.output


def test_a_failed_trajectory_only_recording_resumes(tmp_path):
    """Ctrl-C (a failed store whose buffered steps were written past its last durable point),
    no momentum, a cosine schedule stepped every step, no hypergradients."""
    options = dict(
        mode="trajectory", momentum=0.0, schedule="cosine", track="60", durable_seconds=0.0
    )
    whole = tmp_path / "whole.zarr"
    record_run(tiny_config(whole, batch_size=512, **options))
    out = tmp_path / "stopped.zarr"

    def interrupt(progress):
        if progress.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_run(tiny_config(out, batch_size=512, **options), progress=interrupt)
    group = zarr.open_group(out, mode="r")
    assert group.attrs["status"] == "failed" and group["lr"].shape[0] == 5
    resume(out, "from its durable point at step 4")
    assert "failure" not in zarr.open_group(out, mode="r").attrs
    assert_same_store(out, whole)


def test_durable_points_change_nothing_in_the_store(runs, tmp_path):
    whole, _ = runs
    never = tmp_path / "never.zarr"
    record([*APPROXIMATE[:-1], "inf"], never)
    a, b = zarr.open_group(never, mode="r"), zarr.open_group(whole["approximate"], mode="r")
    for name, array in a.arrays():
        np.testing.assert_array_equal(array[...], b[name][...], err_msg=name)


def assert_refused(store: Path, fragment: str) -> None:
    refused = runner.invoke(app, ["record", "--resume", str(store)])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], refused.output


def test_what_cannot_be_resumed_is_refused_with_one_line(runs, tmp_path):
    own = tmp_path / "own.zarr"
    record_small_run(own, mode="approximate", epochs=1)
    zarr.open_group(own, mode="r+").attrs["status"] = "recording"
    info = runner.invoke(app, ["info", str(own)])
    assert "resume: not by `hydra-store record --resume`" in info.output
    assert_refused(own, "was recorded by a training loop of your own")
    # A recording that a live process is still writing.
    live = tmp_path / "live.zarr"
    shutil.copytree(runs[0]["approximate"], live)
    zarr.open_group(live, mode="r+").attrs["status"] = "recording"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = LockHolder(
            sleeper.pid, _process_start(sleeper.pid), socket.gethostname(), "x", "now"
        )
        store_lock_file(live).write_text(json.dumps(dataclasses.asdict(holder)))
        assert_refused(live, f"is being written by `x` (pid {sleeper.pid}")
    finally:
        sleeper.kill()
        sleeper.wait()
