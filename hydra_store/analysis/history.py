"""The paper's Figure 3: how far HyDRA's Hessian-free hypergradient drifts from the exact one
over training. From a store recorded with `--mode both --hypergradient-history` (h and h_exact
of every tracked sample at every checkpoint), the error ``|h_exact - h|_2`` of every tracked
sample at every checkpoint, its mean and spread, as a result group (`history/<name>`) and a PNG.

The relative error ``|h_exact - h| / |h_exact|`` is stored beside it (NaN where h_exact is 0,
e.g. at checkpoint 0 and for samples not drawn yet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from hydra_store.errors import AnalysisError
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

HISTORY_GROUP = "history"
APPROXIMATE, EXACT = "hypergradient_history", "hypergradient_exact_history"
# Bytes of one array read at a time (two arrays are read in step).
BLOCK_BYTES = 32 * 2**20


def history_errors(root: zarr.Group) -> tuple[np.ndarray, np.ndarray]:
    """(|h_exact - h|_2, |h_exact|_2), each (checkpoint, sample) float64, from the two history
    arrays, read a block of samples of one checkpoint at a time."""
    if APPROXIMATE not in root or EXACT not in root:
        raise AnalysisError(
            "this store has no hypergradient history of both recurrences; record it with "
            "`hydra-store record --mode both --hypergradient-history`"
        )
    approximate, exact = root[APPROXIMATE], root[EXACT]
    if approximate.shape != exact.shape:
        raise AnalysisError(
            f"{APPROXIMATE} {approximate.shape} and {EXACT} {exact.shape} differ in shape"
        )
    n_checkpoints, n_samples, width = approximate.shape
    rows = max(1, BLOCK_BYTES // max(1, width * approximate.dtype.itemsize))
    error = np.zeros((n_checkpoints, n_samples))
    norm = np.zeros((n_checkpoints, n_samples))
    for k in range(n_checkpoints):
        for start in range(0, n_samples, rows):
            stop = min(n_samples, start + rows)
            h = np.asarray(approximate[k, start:stop], dtype=np.float64)
            h_exact = np.asarray(exact[k, start:stop], dtype=np.float64)
            error[k, start:stop] = np.linalg.norm(h_exact - h, axis=1)
            norm[k, start:stop] = np.linalg.norm(h_exact, axis=1)
    return error, norm


@dataclass
class HistorySummary:
    """What `run_history` computed and where it wrote it."""

    path: Path
    group: str
    png: Path
    checkpoint_step: np.ndarray
    error: np.ndarray = field(repr=False)  # (checkpoint, sample)
    relative_error: np.ndarray = field(repr=False)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        last = self.error[-1]
        relative = self.relative_error[-1]
        relative = relative[np.isfinite(relative)]
        median = f"{np.median(relative):.3g}" if relative.size else "n/a"
        return [
            f"|h_exact - h|_2 of {self.error.shape[1]} tracked samples at "
            f"{self.error.shape[0]} checkpoints, in {self.seconds:.1f} s",
            f"at the end (step {int(self.checkpoint_step[-1])}): mean {last.mean():.4g}, "
            f"median {np.median(last):.4g}, 90th percentile {np.percentile(last, 90):.4g}; "
            f"relative to |h_exact|: median {median}",
            f"written to {self.path}/{self.group}: error, relative_error",
            f"plot: {self.png}",
        ]


def plot_history(out: Path, steps: np.ndarray, error: np.ndarray, title: str) -> None:
    """Mean and spread (10-90th and 25-75th percentiles) of the error over checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hydra_store.analysis.plots import save_png

    fig, axis = plt.subplots(figsize=(6, 3.8))
    low, q1, median, q3, high = np.percentile(error, [10, 25, 50, 75, 90], axis=1)
    axis.fill_between(steps, low, high, alpha=0.2, label="10-90th percentile")
    axis.fill_between(steps, q1, q3, alpha=0.35, label="25-75th percentile")
    axis.plot(steps, error.mean(axis=1), marker="o", ms=3, label="mean")
    axis.plot(steps, median, ls="--", lw=1, label="median")
    axis.set_xlabel("training step")
    axis.set_ylabel(r"$\|h_{exact} - h\|_2$")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    fig.tight_layout()
    save_png(fig, out, dpi=110)
    plt.close(fig)


@reads_store
def run_history(
    path: str | Path,
    *,
    name: str = "hypergradient_error",
    png: str | Path | None = None,
    out: str | Path | None = None,
) -> HistorySummary:
    """The approximate hypergradient's error against the exact one at every checkpoint of a
    store recorded with `--mode both --hypergradient-history`: written to `history/<name>` (of
    the results store `out` when given) and plotted to `png` (default: `<store>-history.png`
    beside the store)."""
    started = time.perf_counter()
    path = store_path(path)
    root = open_group(path)
    require_complete(root, path)
    error, norm = history_errors(root)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.where(norm > 0, error / np.where(norm > 0, norm, 1.0), np.nan)
    steps = np.asarray(root["checkpoint_step"][:], dtype=np.int64)
    if steps.size != error.shape[0]:
        raise AnalysisError(
            f"the history has {error.shape[0]} checkpoints but the store {steps.size}"
        )
    sample = np.asarray(root["sample"][:], dtype=np.int64)
    results = results_root(path, out)
    png_path = store_path(png) if png is not None else path.with_name(f"{path.stem}-history.png")
    plot_history(
        png_path,
        steps,
        error,
        f"HyDRA approximate vs exact hypergradient, {error.shape[1]} samples ({path.name})",
    )
    group = f"{HISTORY_GROUP}/{name}"
    arrays = {
        "checkpoint_step": (steps, ("checkpoint",), {}),
        "sample": (sample, ("sample",), {}),
        "error": (
            error,
            ("checkpoint", "sample"),
            {"long_name": "|h_exact - h|_2 at each checkpoint"},
        ),
        "relative_error": (
            relative,
            ("checkpoint", "sample"),
            {"long_name": "|h_exact - h|_2 / |h_exact|_2 (NaN where h_exact = 0)"},
        ),
        "mean_error": (error.mean(axis=1), ("checkpoint",), {}),
        "std_error": (error.std(axis=1), ("checkpoint",), {}),
    }
    seconds = time.perf_counter() - started
    write_result_group(results, group, arrays, {"png": str(png_path), "seconds": seconds})
    return HistorySummary(results, group, png_path, steps, error, relative, seconds)
