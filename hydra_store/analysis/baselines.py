"""What the baseline contribution methods beside HyDRA (influence functions, TracIn, TRAK-style;
analysis/influence.py, tracin.py, trak.py) share: loading the run at a checkpoint, the arrays
of their result groups, reading their totals back, and the lines of their summaries.

Each writes `<group>/<test set>` with `train` (N,), `train_label` (N,) for class labels, and
`total_contribution` (train,) float64: C(i) of every training sample, in HyDRA's scale and sign
convention (positive: removing i would raise the test loss, so i helps).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.analysis.test_sets import TestSet, group_name, resolve_test_set
from hydra_store.core.losses import LossFunction
from hydra_store.core.parameters import ParameterLayout
from hydra_store.data.datasets import Split
from hydra_store.errors import AnalysisError
from hydra_store.replay.recorded_run import RunInputs, load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import open_group, require_complete

SIGN_CONVENTION = "positive: removing the sample would raise the test loss (it helps)"
TOTAL = "total_contribution"

ArraySpec = tuple[np.ndarray, tuple[str, ...], dict[str, Any]]


@dataclass
class RecordedRun:
    """A complete store's trajectory, training split, test set and model (at the last
    checkpoint, in `dtype`), with the loss every gradient takes (the store's)."""

    trajectory: Trajectory
    train: Split
    tests: TestSet
    model: torch.nn.Module
    checkpoint: int

    @property
    def layout(self) -> ParameterLayout:
        return self.trajectory.layout

    @property
    def loss(self) -> LossFunction:
        return self.trajectory.loss

    @property
    def n_train(self) -> int:
        return self.trajectory.n_train

    @property
    def final_weight_decay(self) -> float:
        """The weight decay of the last recorded step (the lambda of the training objective at
        the final weights)."""
        n = self.trajectory.n_steps
        return self.trajectory.settings(n - 1, n)[0].weight_decay if n else 0.0


def load_recorded_run(
    path: Path, test_set: str, inputs: RunInputs | None, dtype: torch.dtype | None = None
) -> RecordedRun:
    """The run of a complete store at its last checkpoint (refusing an unfinished one)."""
    require_complete(open_group(path), path)
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    data = load_run_data(path, inputs)
    if len(data.train) != trajectory.n_train:
        raise AnalysisError(
            f"the training split has {len(data.train)} samples but the store records "
            f"n_train={trajectory.n_train}"
        )
    tests = resolve_test_set(path, test_set, run=data)
    checkpoint = len(trajectory.checkpoint_step) - 1
    model = model_at_checkpoint(path, checkpoint, dtype=dtype, inputs=inputs)
    return RecordedRun(trajectory, data.train, tests, model, checkpoint)


def total_arrays(train: Split, values: np.ndarray, long_name: str) -> dict[str, ArraySpec]:
    """`train`, `train_label` (class labels only) and `total_contribution` of a result group."""
    n = int(values.size)
    arrays: dict[str, ArraySpec] = {"train": (np.arange(n, dtype=np.int64), ("train",), {})}
    if not train.targets.is_floating_point():
        arrays["train_label"] = (train.targets.numpy().astype(np.int64), ("train",), {})
    arrays[TOTAL] = (np.asarray(values, dtype=np.float64), ("train",), {"long_name": long_name})
    return arrays


def read_total(path: Path, group: str, test_set: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(training indices, C(i), the group's attributes) of `<group>/<test set>`, or None when
    the method has not run on that test set."""
    root = open_group(path)
    name = f"{group}/{group_name(test_set)}"
    try:
        node = root[name]
    except KeyError:
        return None
    if TOTAL not in node:
        return None
    values = np.asarray(node[TOTAL][:], dtype=np.float64)
    index = np.asarray(node["train"][:], dtype=np.int64) if "train" in node else None
    if index is None or index.size != values.size:
        index = np.arange(values.size, dtype=np.int64)
    return index, values, dict(node.attrs)


def extremes_lines(values: np.ndarray, count: int = 5) -> list[str]:
    """The most helpful and most harmful training samples, as two summary lines."""
    order = np.argsort(values, kind="stable")
    return [
        "most helpful: " + ", ".join(f"{i} ({values[i]:+.3g})" for i in order[::-1][:count]),
        "most harmful: " + ", ".join(f"{i} ({values[i]:+.3g})" for i in order[:count]),
    ]
