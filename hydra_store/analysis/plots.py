"""PNG figures: the inter-class heatmap and image grids of influencers (the paper's Table 2)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def save_png(fig: Any, path: Any, *, dpi: int) -> None:
    """Write a figure through the path's own `open`, so that a store on object storage (a
    `UPath`) receives its figures like a local one."""
    with path.open("wb") as handle:
        fig.savefig(handle, format="png", dpi=dpi)


def interclass_heatmap(
    matrix: np.ndarray, class_names: Sequence[str], path: Path, *, title: str
) -> Path:
    """Rows: training classes; columns: test classes. NaN entries are drawn blank."""
    n = len(class_names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    finite = np.asarray(matrix)[np.isfinite(matrix)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    image = ax.imshow(matrix, cmap="RdBu", vmin=-bound, vmax=bound)
    ax.set_xticks(range(n), labels=list(class_names), rotation=90 if n > 10 else 0)
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("test class")
    ax.set_ylabel("training class")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)
    return path


def _show(ax, image: np.ndarray) -> None:
    """An input tensor (C, H, W) rescaled to [0, 1] for display."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3 and image.shape[0] in (1, 3):
        image = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
    low, high = float(image.min()), float(image.max())
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def influencer_grid(
    rows: Sequence[dict], class_names: Sequence[str], path: Path, *, title: str
) -> Path:
    """One row per test sample: the test image, then its helpers, then its harmers.

    Each row dict: test_image, test_label, helpers/harmers as lists of (image, label, value).
    """
    n_cols = 1 + max(len(r["helpers"]) + len(r["harmers"]) for r in rows)
    fig, axes = plt.subplots(
        len(rows), n_cols, figsize=(1.4 * n_cols, 1.7 * len(rows)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r, row in enumerate(rows):
        ax = axes[r, 0]
        ax.axis("on")
        _show(ax, row["test_image"])
        ax.set_title(f"test {row['test_index']}\n{class_names[row['test_label']]}", fontsize=7)
        tiles = [("help", t) for t in row["helpers"]] + [("harm", t) for t in row["harmers"]]
        for c, (kind, (image, label, value)) in enumerate(tiles, start=1):
            ax = axes[r, c]
            ax.axis("on")
            _show(ax, image)
            color = "tab:blue" if kind == "help" else "tab:red"
            ax.set_title(f"{kind} {class_names[label]}\n{value:+.2e}", fontsize=7, color=color)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)
    return path


def extremes_grid(
    groups: dict[str, list[tuple[np.ndarray, int, int, float]]],
    class_names: Sequence[str],
    path: Path,
    *,
    title: str,
) -> Path:
    """One row per group (most helpful, most harmful): tiles of (image, index, label, C(i))."""
    n_cols = max(1, max(len(v) for v in groups.values()))
    fig, axes = plt.subplots(
        len(groups), n_cols, figsize=(1.4 * n_cols, 1.8 * len(groups)), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for r, (name, tiles) in enumerate(groups.items()):
        for c, (image, index, label, value) in enumerate(tiles):
            ax = axes[r, c]
            ax.axis("on")
            _show(ax, image)
            ax.set_title(f"#{index} {class_names[label]}\n{value:+.2e}", fontsize=7)
        axes[r, 0].set_ylabel(name.replace("_", " "), fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=100)
    plt.close(fig)
    return path
