"""The memory budget, worked out before anything is allocated or written: a state that fits
stays in memory, a larger one is split into partitions, and what cannot fit even so is refused
with one line and nothing written."""

from __future__ import annotations

import shutil
from collections import namedtuple

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hydra_store.errors import InvalidArgumentError
from hydra_store.recording import memory
from hydra_store.recording.memory import (
    available_memory_bytes,
    check_state_fits,
    parse_size,
    plan_state,
)
from hydra_store_cli.main import app

# digits, the default MLP (2,410 parameters), momentum, float32: 2 x 2,410 x 4 bytes a row.
DIGITS_ROW_BYTES = 19_280


def test_available_memory_is_read():
    available = available_memory_bytes()
    assert available is not None and available > 2**20


def test_sizes_are_parsed_in_both_unit_systems():
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2e6") == 2_000_000
    with pytest.raises(InvalidArgumentError, match="'lots' is not a size; write it like 4GiB"):
        parse_size("lots")
    with pytest.raises(InvalidArgumentError, match="must be a positive size"):
        parse_size("0B")


def test_a_state_within_the_budget_stays_in_memory():
    plan = plan_state(1000, 100, budget=100_000, available=10**9)
    assert (plan.n_partitions, plan.rows_per_partition, plan.partitioned) == (1, 1000, False)
    assert "in memory" in plan.describe()
    unbounded = plan_state(10**6, 10**6, budget=None)
    assert unbounded.n_partitions == 1


def test_a_larger_state_is_split_into_whole_chunks_per_worker():
    # 1,000 rows of 100 bytes in 25,000 bytes: 250 rows fit; rounded down to chunks of 64.
    plan = plan_state(1000, 100, budget=25_000, chunk_rows=64, available=10**9)
    assert plan.rows_per_partition == 192 and plan.n_partitions == 6
    assert plan.ranges()[0] == (0, 192) and plan.ranges()[-1] == (960, 1000)
    assert sum(b - a for a, b in plan.ranges()) == 1000
    # Two workers hold two partitions at once: each gets half the budget.
    two = plan_state(1000, 100, budget=25_000, workers=2, chunk_rows=64, available=10**9)
    assert two.rows_per_partition == 64 and two.n_partitions == 16
    # Below one chunk a partition takes what fits (the store's chunks follow it).
    small = plan_state(1000, 100, budget=3_000, chunk_rows=64, available=10**9)
    assert small.rows_per_partition == 30 and small.n_partitions == 34
    assert "34 partitions of up to 30 samples" in small.describe()


def test_what_cannot_fit_is_refused_saying_what_would():
    with pytest.raises(InvalidArgumentError, match=r"needs 1\.0 KiB, more than the memory budget"):
        plan_state(10, 1024, budget=1000, available=10**9)
    with pytest.raises(InvalidArgumentError, match=r"more than the 1\.0 MiB of memory available"):
        plan_state(10, 10, budget=2 * 2**20, available=2**20)
    with pytest.raises(InvalidArgumentError, match="--workers must be at least 1"):
        plan_state(10, 10, budget=100, workers=0)


def test_a_custom_backend_state_is_checked_against_memory():
    check_state_fits(100, 1000, available=10**6)  # 1e5 bytes of 8e5 allowed
    with pytest.raises(InvalidArgumentError, match=r"at most 800 of the 1000 samples fit"):
        check_state_fits(1000, 1000, available=10**6)
    check_state_fits(10**9, 10**9, available=None)  # unknown memory: no check


def _fake_memory(monkeypatch, available: int) -> None:
    monkeypatch.setattr("hydra_store.recording.recorder.available_memory_bytes", lambda: available)


def test_little_memory_records_in_partitions_instead_of_being_killed(tmp_path, monkeypatch):
    # 1,437 rows x 19,280 bytes = 26.4 MiB against 80% of 10 MiB: partitions, not a refusal.
    _fake_memory(monkeypatch, 10 * 2**20)
    out = tmp_path / "run.zarr"
    result = CliRunner().invoke(app, ["record", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "memory budget 8.0 MiB (80% of the memory available)" in result.output
    assert "tracked state 26.4 MiB for 1437 samples: 4 partitions of up to 435 samples" in (
        result.output
    )
    assert "4 partitions recorded after training" in result.output
    info = CliRunner().invoke(app, ["info", str(out)])
    assert "partitions: 4 of up to 435 samples" in info.output
    assert "4 done, 1437 of 1437 rows written" in info.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--memory-budget", "10KB"], "needs 18.8 KiB, more than the memory budget of 9.8 KiB"),
        (["--memory-budget", "1TiB"], "--memory-budget 1024.0 GiB is more than the"),
        (["--memory-budget", "plenty"], "--memory-budget: 'plenty' is not a size"),
        (["--memory-budget", "1e400"], "--memory-budget: '1e400' is not a size"),
        (["--workers", "0"], "--workers: must be at least 1"),
        (
            ["--device-memory-budget", "1GiB"],
            "--device-memory-budget: is the GPU memory the tracked state may take; give it "
            "with --device cuda",
        ),
        (["--device-memory-budget", "lots"], "--device-memory-budget: 'lots' is not a size"),
        (["--project-dim", "64", "--mode", "both"], "--project-dim: projects the approximate"),
        (["--project-dim", "5000"], "--project-dim 5000 is not smaller than the 2410 parameters"),
    ],
)
def test_impossible_budgets_are_refused_with_one_line(tmp_path, options, message):
    out = tmp_path / "run.zarr"
    result = CliRunner().invoke(app, ["record", "--epochs", "1", "--out", str(out), *options])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_a_store_larger_than_the_free_disk_is_refused(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    out = tmp_path / "run.zarr"
    result = CliRunner().invoke(app, ["record", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "the store needs about 13.2 MiB on disk but" in result.output
    assert "976.6 KiB free" in result.output
    assert not out.exists()


def test_the_share_of_memory_is_the_documented_default():
    assert memory.STATE_MEMORY_SHARE == 0.8
    assert memory.default_memory_budget(1000) == 800
    assert memory.default_memory_budget(None) is None


def test_a_gpu_budget_keeps_a_state_on_the_gpu_in_host_memory_or_in_partitions():
    """Host budget 100,000 bytes; 1,000 rows of 50 bytes (50,000) or 150 bytes (150,000)."""
    on_gpu = plan_state(1000, 50, budget=100_000, available=10**9, device_budget=60_000)
    assert (on_gpu.location, on_gpu.n_partitions) == ("device", 1)
    assert on_gpu.describe().endswith("tracked state 48.8 KiB for 1000 samples, in GPU memory")
    assert "GPU budget 58.6 KiB" in on_gpu.describe()
    # Over the GPU's budget but within the host's: host memory, where the recurrence allows.
    staged = plan_state(
        1000, 50, budget=100_000, available=10**9, device_budget=20_000, host_staging=True
    )
    assert (staged.location, staged.n_partitions, staged.partitioned) == ("host", 1, False)
    assert "in host memory: each step's batch rows are copied to the GPU and back" in (
        staged.describe()
    )
    # The exact recurrence touches every row every step: partitions that fit the GPU.
    exact = plan_state(1000, 50, budget=100_000, available=10**9, device_budget=20_000)
    assert (exact.location, exact.rows_per_partition, exact.n_partitions) == ("device", 400, 3)
    # Over the host's budget: partitions that fit the smaller of the two budgets.
    for device_budget, rows in ((30_000, 200), (200_000, 666)):
        plan = plan_state(
            1000,
            150,
            budget=100_000,
            available=10**9,
            device_budget=device_budget,
            host_staging=True,
        )
        assert (plan.partitioned, plan.rows_per_partition) == (True, rows)
    with pytest.raises(InvalidArgumentError, match="more than the GPU memory budget of 100 B"):
        plan_state(10, 150, budget=10**6, available=10**9, device_budget=100)
    with pytest.raises(InvalidArgumentError, match="give --device-memory-budget at least 150 B"):
        plan_state(10, 150, budget=10**6, available=10**9, device_budget=100)


def test_the_gpu_share_is_the_documented_default():
    assert memory.DEVICE_STATE_SHARE == 0.7
    assert memory.default_device_budget(1000) == 700
    assert memory.default_device_budget(None) is None


def test_a_state_over_the_gpu_budget_is_recorded_in_host_memory_with_the_same_result(
    tmp_path, monkeypatch
):
    """The recorder's choice and the backend it builds, on the CPU: the GPU's free memory is
    faked to 100 KiB (the state is 26.4 MiB), so the state goes to host memory, staged."""
    default = tmp_path / "default.zarr"
    assert (
        CliRunner().invoke(app, ["record", "--epochs", "1", "--out", str(default)]).exit_code == 0
    )
    monkeypatch.setattr(
        "hydra_store.recording.recorder.device_free_memory_bytes", lambda device: 100 * 2**10
    )
    staged = tmp_path / "staged.zarr"
    result = CliRunner().invoke(app, ["record", "--epochs", "1", "--out", str(staged)])
    assert result.exit_code == 0, result.output
    assert "GPU budget 70.0 KiB; tracked state 26.4 MiB for 1437 samples, in host memory" in (
        result.output
    )
    a, b = zarr.open_group(default, mode="r"), zarr.open_group(staged, mode="r")
    assert float(np.abs(a["hypergradient"][:]).max()) > 0
    np.testing.assert_allclose(b["hypergradient"][:], a["hypergradient"][:], rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(b["weights"][:], a["weights"][:])
