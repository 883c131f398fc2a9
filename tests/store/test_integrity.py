"""Checksums on every chunk, `verify`, and readers that refuse a damaged store with one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.stored import analyze
from hydra_store.analysis.validation import run_validation
from hydra_store.arguments import AnalyzeConfig, ValidateConfig
from hydra_store.errors import StoreCorruptError
from hydra_store.replay.verification import verify_recording
from hydra_store.store.integrity import expected_chunks, has_checksums, missing_chunks
from hydra_store_cli.main import app

runner = CliRunner()


def chunk_file(store: Path, name: str, index: tuple[int, ...]) -> Path:
    return store.joinpath(name, "c", *map(str, index))


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for k in range(middle, min(len(data) - 4, middle + count)):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_every_array_of_a_recording_has_checksums_and_all_its_chunks(digits_store):
    group = zarr.open_group(digits_store, mode="r")
    arrays = [a for _, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
    assert len(arrays) > 20
    assert all(has_checksums(a) for a in arrays)
    assert all(missing_chunks(digits_store, a) == [] for a in arrays)


def test_verify_passes_an_intact_store_and_replays_it(store_copy):
    report = verify_recording(store_copy)
    group = zarr.open_group(store_copy, mode="r")
    expected = sum(
        len(expected_chunks(a))
        for _, a in group.members(max_depth=None)
        if isinstance(a, zarr.Array)
    )
    assert report.ok and report.faults == [] and report.skipped == []
    assert report.chunks == expected > 0 and report.unchecked == []
    result = runner.invoke(app, ["verify", str(store_copy)])
    assert result.exit_code == 0, result.output
    assert "no faults" in result.output


def test_verify_names_every_damaged_chunk(store_copy):
    delete = chunk_file(store_copy, "hypergradient", (0, 0))
    delete.unlink()
    truncate(chunk_file(store_copy, "weights", (1, 0)))
    flip_bytes(chunk_file(store_copy, "batch_index", (0, 0)))
    report = verify_recording(store_copy)
    faults = "\n".join(report.faults)
    assert len(report.faults) == 3, faults
    assert "missing chunk hypergradient[0:" in faults
    assert "checksum mismatch in chunk weights[1:2, " in faults
    assert "checksum mismatch in chunk batch_index[0:" in faults
    assert report.skipped == ["the replay (the store has faults already)"]
    result = runner.invoke(app, ["verify", str(store_copy)])
    assert result.exit_code == 1
    assert "3 fault(s)" in result.output and "Traceback" not in result.output


def test_verify_finds_a_replay_that_misses_its_checkpoint(store_copy):
    group = zarr.open_group(store_copy, mode="r+")
    lr = np.asarray(group["lr"][:])
    lr[5] *= 1.5
    group["lr"][:] = lr  # rewritten whole: valid checksums, wrong trajectory
    report = verify_recording(store_copy)
    assert len(report.faults) == 1 and report.faults[0].startswith("replay: replaying steps")
    assert "does not reproduce checkpoint 1" in report.faults[0]


@pytest.mark.parametrize(
    ("name", "index", "damage", "replay_reads_it"),
    [
        ("hypergradient", (0, 0), Path.unlink, True),  # a missing chunk: every reader refuses
        ("hypergradient", (0, 0), truncate, False),  # reverse mode never reads hypergradients
        ("weights", (3, 0), flip_bytes, True),
        ("weights", (3, 0), Path.unlink, True),
    ],
)
def test_the_analysers_refuse_a_damaged_store_with_one_line(
    store_copy, name, index, damage, replay_reads_it
):
    damage(chunk_file(store_copy, name, index))
    with pytest.raises(StoreCorruptError, match=r"is damaged: .*hydra-store verify"):
        analyze(store_copy, AnalyzeConfig(top_k=2, clusters_k=10, figures=False))
    if replay_reads_it:
        with pytest.raises(StoreCorruptError, match="is damaged"):
            run_exact_analysis(store_copy)
        with pytest.raises(StoreCorruptError, match="is damaged"):
            run_validation(store_copy, ValidateConfig(samples=2))
    result = runner.invoke(app, ["analyze", str(store_copy), "--clusters-k", "10"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is damaged" in errors[0]
    assert not (store_copy / "analysis" / "test").exists()


def test_a_killed_store_marked_complete_is_refused_not_read_as_zeros(store_copy):
    for chunk in (store_copy / "hypergradient" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    assert zarr.open_group(store_copy, mode="r").attrs["status"] == "complete"
    with pytest.raises(StoreCorruptError, match="chunk\\(s\\) of 'hypergradient' are missing"):
        analyze(store_copy, AnalyzeConfig(figures=False))
