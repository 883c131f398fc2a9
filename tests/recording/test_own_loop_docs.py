"""docs/own-loop.md's regression example, run as written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr


def test_the_regression_example_runs_as_written(tmp_path, monkeypatch, capsys):
    page = (Path(__file__).parents[2] / "docs" / "own-loop.md").read_text()
    section = page.split("## A regression loss", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "own-loop.md", "exec"), namespace)
    store = zarr.open_group(tmp_path / "regression.zarr", mode="r")
    assert store.attrs["status"] == "complete"
    assert store.attrs["loss"] == {"spec": "mse", "classification": False}
    exact, check = namespace["exact"], namespace["check"]
    assert exact.n_train == 200 and np.isfinite(exact.total_exact).all()
    assert check.samples.size == 10
    assert "leave-one-out retraining of 10 training samples" in capsys.readouterr().out
