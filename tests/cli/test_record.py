"""`hydra-store record` and `info` as a user runs them: output, bad input, interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from hydra_store_cli.main import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def run(*args: str):
    return runner.invoke(app, list(args))


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code != 0
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_record_and_info(tmp_path):
    out = tmp_path / "run.zarr"
    result = run("record", "--epochs", "2", "--lr", "0.1", "--track", "100", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "status: complete" in result.output
    assert "1437 training samples, 100 tracked" in result.output
    assert "test accuracy" in result.output
    info = run("info", str(out))
    assert info.exit_code == 0
    assert "status complete" in info.output
    assert "hypergradient: 100 x 2410 float32" in info.output


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--dataset", "imagenet"], ["imagenet", "digits"]),
        (["--model", "resnet"], ["resnet", "mlp"]),
        (["--dataset", "mnist"], ["--data-root"]),
        (["--lr", "-1"], ["--lr"]),
        (["--epochs", "0"], ["--epochs"]),
        (["--momentum", "1.5"], ["--momentum"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--label-noise", "1.2"], ["--label-noise"]),
        (["--schedule", "warmup"], ["warmup", "cosine"]),
        (["--track", "99999"], ["only 1437"]),
        (["--model", "lenet5"], ["lenet5", "28x28"]),
        (["--device", "tpu"], ["--device"]),
    ],
)
def test_bad_input_gives_one_error_line_and_writes_nothing(tmp_path, args, fragments):
    out = tmp_path / "never.zarr"
    result = run("record", "--out", str(out), *args)
    assert_one_error_line(result, *fragments)
    assert not out.exists()


def test_missing_data_files_are_named(tmp_path):
    result = run(
        "record",
        "--dataset",
        "mnist",
        "--data-root",
        str(tmp_path),
        "--out",
        str(tmp_path / "x.zarr"),
    )
    assert_one_error_line(result, "train-images-idx3-ubyte", str(tmp_path))


def test_existing_store_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "run.zarr"
    assert run("record", "--epochs", "1", "--track", "10", "--out", str(out)).exit_code == 0
    before = zarr.open_group(out).attrs["created"]
    assert_one_error_line(run("record", "--epochs", "1", "--out", str(out)), "--overwrite")
    assert zarr.open_group(out).attrs["created"] == before
    # bad input with --overwrite still leaves the old store alone: validation comes first
    assert_one_error_line(run("record", "--overwrite", "--lr", "0", "--out", str(out)), "--lr")
    assert zarr.open_group(out).attrs["status"] == "complete"
    again = run("record", "--epochs", "1", "--track", "20", "--overwrite", "--out", str(out))
    assert again.exit_code == 0
    assert zarr.open_group(out)["hypergradient"].shape[0] == 20


def test_info_on_missing_and_foreign_paths(tmp_path):
    assert_one_error_line(run("info", str(tmp_path / "nope.zarr")), "no store at")
    (tmp_path / "plain").mkdir()
    assert_one_error_line(run("info", str(tmp_path / "plain")), "not a Zarr v3 store")


def _start_long_recording(
    out: Path, dataset: str = "synthetic:n=4000,size=12", model: str = "mlp"
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "hydra_store_cli.main",
        "record",
        "--dataset",
        dataset,
        "--model",
        model,
        "--epochs",
        "500",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_for_checkpoints(out: Path, count: int, proc: subprocess.Popen, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if zarr.open_group(out, mode="r")["checkpoint_step"].shape[0] >= count:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError("the recording made no progress")


@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGKILL, "recording"), (signal.SIGINT, "failed"), (signal.SIGTERM, "failed")],
)
def test_a_killed_recording_never_looks_complete(tmp_path, sig, status):
    out = tmp_path / "killed.zarr"
    proc = _start_long_recording(out)
    _check_killed(out, proc, sig, status)


def test_sigterm_inside_a_batch_norm_step_is_one_line_and_a_failed_store(tmp_path):
    """Most of a BatchNorm step runs in TorchScript (its batched backward), which wraps the
    signal handler's exception into a RuntimeError: still one line and `failed: Terminated`."""
    out = tmp_path / "bn.zarr"
    proc = _start_long_recording(out, "synthetic:n=256,channels=3,size=16", "bncnn")
    _check_killed(out, proc, signal.SIGTERM, "failed")


def test_an_interruption_wrapped_by_torchscript_is_unwrapped():
    from hydra_store.errors import Terminated, unwrap_interruption

    wrapped = RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "RuntimeError: Terminated: SIGTERM received"
    )
    assert isinstance(unwrap_interruption(wrapped), Terminated)
    assert isinstance(unwrap_interruption(RuntimeError("x KeyboardInterrupt")), KeyboardInterrupt)
    other = RuntimeError("shape mismatch")
    assert unwrap_interruption(other) is other


def _check_killed(out: Path, proc: subprocess.Popen, sig, status: str) -> None:
    try:
        _wait_for_checkpoints(out, 2, proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    group = zarr.open_group(out, mode="r")
    assert group.attrs["status"] == status
    assert "hypergradient" not in dict(group.arrays())
    if sig != signal.SIGKILL:
        assert "Traceback" not in proc.stderr.read().decode()
        reason = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "Terminated: SIGTERM"}
        assert group.attrs["failure"].startswith(reason[sig])
        # the buffered steps were flushed: the trajectory reaches the recorded step
        steps = group["lr"].shape[0]
        assert steps == group.attrs["recorded_step"] >= int(group["checkpoint_step"][-1]) > 0


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (28, "the disk is full"),  # ENOSPC
        (13, "permission denied"),  # EACCES
        (30, "the file system is read-only"),  # EROFS
    ],
)
def test_a_file_system_failure_during_the_final_write_is_one_line_and_a_failed_store(
    tmp_path, monkeypatch, code, message
):
    from hydra_store.store.writer import RecordingStore

    def no_space(self, name, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(self.path / name))

    monkeypatch.setattr(RecordingStore, "write_rows", no_space)
    out = tmp_path / "full.zarr"
    result = run("record", "--epochs", "1", "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {message} ({out / 'hypergradient'}); " + errors[0].split("; ")[1]]
    attrs = zarr.open_group(out, mode="r").attrs
    assert attrs["status"] == "failed"
    assert f"[Errno {code}]" in attrs["failure"]
