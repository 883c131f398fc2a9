"""The paper's Figure 3 from the command line: `record --mode both --hypergradient-history`
computes and plots it at the end, and `history` recomputes it on any such store."""

from __future__ import annotations

import numpy as np
import zarr
from typer.testing import CliRunner

from hydra_store_cli.main import app

runner = CliRunner()


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def test_record_both_with_history_stores_and_plots_figure_3(tmp_path):
    store = tmp_path / "both.zarr"
    result = invoke(
        "record", "--model", "mlp:hidden=8", "--epochs", "2", "--lr", "0.1",
        "--mode", "both", "--hypergradient-history", "--track", "10", "--out", store,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "the paper's Figure 3" in result.output
    root = zarr.open_group(str(store), mode="r")
    approximate = np.asarray(root["hypergradient_history"][:], dtype=np.float64)
    exact = np.asarray(root["hypergradient_exact_history"][:], dtype=np.float64)
    expected = np.linalg.norm(exact - approximate, axis=2)
    group = root["history/hypergradient_error"]
    np.testing.assert_allclose(group["error"][:], expected, rtol=1e-12)
    np.testing.assert_allclose(group["mean_error"][:], expected.mean(axis=1), rtol=1e-12)
    png = tmp_path / "both-history.png"
    assert png.is_file() and png.stat().st_size > 1000
    assert f"plot: {png}" in result.output

    again = invoke("history", store, "--png", tmp_path / "again.png")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.png").is_file()
    np.testing.assert_allclose(
        zarr.open_group(str(store), mode="r")["history/hypergradient_error/error"][:],
        expected,
        rtol=1e-12,
    )


def test_history_of_a_store_without_both_histories_is_one_line(digits_store):
    result = invoke("history", digits_store)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "--mode both --hypergradient-history" in lines[0]
