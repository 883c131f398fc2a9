"""The memory check before allocating the tracked state: one clear refusal, nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from hydra_store.errors import InvalidArgumentError
from hydra_store.recording import memory
from hydra_store.recording.memory import available_memory_bytes, check_state_fits
from hydra_store_cli.main import app


def test_available_memory_is_read():
    available = available_memory_bytes()
    assert available is not None and available > 2**20


def test_a_state_that_fits_passes_and_one_that_does_not_says_what_fits():
    check_state_fits(100, 1000, available=10**6)  # 1e5 bytes of 8e5 allowed
    with pytest.raises(InvalidArgumentError, match=r"at most 800 of the 1000 samples fit"):
        check_state_fits(1000, 1000, available=10**6)
    check_state_fits(10**9, 10**9, available=None)  # unknown memory: no check


def test_record_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # digits, MLP (2,410 parameters), momentum: 1,437 rows x 2,410 x 4 bytes x 2 = 27.7 MB.
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10 * 2**20)
    monkeypatch.setattr("hydra_store.recording.recorder.available_memory_bytes", lambda: 10 * 2**20)
    out = tmp_path / "run.zarr"
    result = CliRunner().invoke(app, ["record", "--epochs", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "needs 26.4 MiB in memory but 10.0 MiB is available" in errors[0]
    assert "at most 435 of the 1437 samples fit" in errors[0]  # 8 MiB / 19,280 bytes a row
    assert "Traceback" not in result.output
    assert not out.exists()
