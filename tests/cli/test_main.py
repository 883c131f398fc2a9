"""The whole CLI as a user chains it: a trajectory-only recording analysed by reverse mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from typer.testing import CliRunner

from hydra_store_cli.main import app
from tests.cli.test_record import assert_one_error_line

runner = CliRunner()


def test_trajectory_only_store_through_reverse_mode(tmp_path):
    out = tmp_path / "traj.zarr"
    recorded = runner.invoke(
        app, ["record", "--trajectory-only", "--epochs", "2", "--lr", "0.05", "--out", str(out)]
    )
    assert recorded.exit_code == 0, recorded.output
    # the stored-hypergradient analysis says what it needs and what works instead
    needs = runner.invoke(app, ["analyze", str(out)])
    assert_one_error_line(needs, "no stored hypergradients", "--method hydra-exact")
    assert not (out / "analysis").exists()
    exact = runner.invoke(app, ["analyze", str(out), "--method", "hydra-exact", "--per-test", "4"])
    assert exact.exit_code == 0, exact.output
    assert "exact (reverse-mode) contributions of all 1437 training samples" in exact.output
    ds = xr.open_zarr(out, group="reverse/test")
    total = ds["total_contribution_exact"].values
    assert total.shape == (1437,) and np.isfinite(total).all() and np.abs(total).max() > 0
    assert ds["contribution_exact"].shape == (1437, 4)
    info = runner.invoke(app, ["info", str(out)])
    assert "mode trajectory: no hypergradients" in info.output
    assert "reverse: test" in info.output


@pytest.mark.parametrize(
    "args",
    [
        ["record", "--epochs", "0"],
        ["analyze", "missing.zarr"],
        ["validate", "missing.zarr"],
        ["compare", "missing.zarr"],
        ["clean", "missing.zarr"],
    ],
    ids=["record", "analyze", "validate", "compare", "clean"],
)
def test_commands_that_may_run_on_a_gpu_turn_tf32_off(args, monkeypatch, tmp_path):
    """cuDNN's default TF32 convolutions would round float32 inputs to 10 bits on a GPU; every
    command that trains or replays turns them (and TF32 matrix products) off first."""
    monkeypatch.chdir(tmp_path)
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    # torch's flag modules take assignments only (monkeypatch cannot put them back).
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        result = runner.invoke(app, args)
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert result.exit_code != 0  # each fails at once on its input, after the flags are set
    assert after == (False, False)
