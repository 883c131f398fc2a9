"""The PNG figures of an analysis: the inter-class heatmap, and for image data the grid of
each test sample's most helpful and harmful training images and the grid of the training samples
with the most extreme total contribution (the paper's Table 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from hydra_store.analysis import plots
from hydra_store.analysis.test_sets import TestSet
from hydra_store.replay.recorded_run import RunData


def analysis_figures(
    out: Path,
    run: RunData,
    test: TestSet,
    group: zarr.Group,
    normalised: np.ndarray,
    extremes: dict[str, dict[str, np.ndarray]],
    grid_tests: int,
) -> list[Path]:
    """Draw the figures into `out` from the analysis written so far in `group`."""
    out.mkdir(exist_ok=True)
    names = list(test.class_names)
    figures = [
        plots.interclass_heatmap(
            normalised, names, out / "interclass.png", title="inter-class contribution (normalised)"
        )
    ]
    if not test.is_image:
        return figures
    train_inputs = run.train.inputs.numpy()
    train_labels = run.train.targets.numpy()
    helpful = np.asarray(group["top_helpful"][:])
    harmful = np.asarray(group["top_harmful"][:])
    helpful_v = np.asarray(group["top_helpful_contribution"][:])
    harmful_v = np.asarray(group["top_harmful_contribution"][:])
    shown = min(5, helpful.shape[1])
    rows = []
    for j in range(min(grid_tests, len(test.targets))):
        rows.append(
            {
                "test_index": j,
                "test_image": test.inputs[j].numpy(),
                "test_label": int(test.targets[j]),
                "helpers": [
                    (train_inputs[i], int(train_labels[i]), float(v))
                    for i, v in zip(helpful[j, :shown], helpful_v[j, :shown], strict=True)
                ],
                "harmers": [
                    (train_inputs[i], int(train_labels[i]), float(v))
                    for i, v in zip(harmful[j, :shown], harmful_v[j, :shown], strict=True)
                ],
            }
        )
    figures.append(
        plots.influencer_grid(
            rows, names, out / "influencers.png", title="test sample | most helpful | most harmful"
        )
    )
    groups = {
        name: [
            (train_inputs[i], int(i), int(label), float(v))
            for i, label, v in zip(parts["index"], parts["label"], parts["value"], strict=True)
        ]
        for name, parts in extremes.items()
    }
    figures.append(
        plots.extremes_grid(
            groups, names, out / "extremes.png", title="training samples with extreme C(i)"
        )
    )
    return figures
