"""What the baseline contribution methods beside HyDRA (influence functions, TracIn, TRAK-style;
analysis/influence.py, tracin.py, trak.py) share: loading the run at a checkpoint, the arrays
of their result groups, reading their totals back, and the lines of their summaries.

Each writes `<group>/<test set>` with `train` (N,), `train_label` (N,) for class labels, and
`total_contribution` (train,) float64: C(i) of every training sample, in HyDRA's scale and sign
convention (positive: removing i would raise the test loss, so i helps); with `per_test`, also
`test` (K,) (and `test_label`) and `contribution` (train, test) float64, C(i, j) for each chosen
test sample j, whose mean over all test samples is C(i). Each runs at any stored checkpoint
(`checkpoint`; the attributes `checkpoint`, `step` and `n_checkpoints` say which), and gives
`compare` its C(i) at a list of checkpoints without writing anything (`totals_at`).

Each runs on the device its config names (`device`, None: the CPU): the model is built there
(`load_recorded_run`, `RecordedRun.at`), the training and test data stay in host memory and go
to the model's device as they are used (batch by batch; the influence Hessian's samples once),
every tensor the computation makes is made there, and the results come back to host memory
before they become numpy arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import jvp, vmap

from hydra_store.analysis.methods import ContributionMethod, Totals
from hydra_store.analysis.reverse import resolve_checkpoint, select_test_samples
from hydra_store.analysis.test_sets import TestSet, group_name, resolve_test_set
from hydra_store.core.gradients import (
    per_sample_directional_derivatives,
    per_sample_loss_function,
    per_sample_loss_gradients,
)
from hydra_store.core.losses import LossFunction
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
from hydra_store.data.datasets import Split
from hydra_store.errors import AnalysisError
from hydra_store.replay.recorded_run import RunInputs, load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import open_group, require_complete

SIGN_CONVENTION = "positive: removing the sample would raise the test loss (it helps)"
TOTAL = "total_contribution"
PER_TEST = "contribution"

ArraySpec = tuple[np.ndarray, tuple[str, ...], dict[str, Any]]


@dataclass
class RecordedRun:
    """A complete store's trajectory, training split, test set and model at one checkpoint (in
    `dtype`, on `device`; None: the CPU), with the loss every gradient takes (the store's). The
    data stay in host memory; each computation follows the model's device.

    The model is in eval mode (running statistics, no dropout), as the test losses are taken:
    the baselines score each training sample by its own gradient and Hessian at the checkpoint's
    weights, which in training mode would depend on the other samples of whatever block it is
    computed in (BatchNorm) and on masks drawn afresh at each call (dropout)."""

    path: Path
    trajectory: Trajectory
    train: Split
    tests: TestSet
    model: torch.nn.Module
    checkpoint: int
    inputs: RunInputs | None = None
    dtype: torch.dtype | None = None
    device: str | None = None

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
    def n_checkpoints(self) -> int:
        return len(self.trajectory.checkpoint_step)

    @property
    def step(self) -> int:
        """The training step of the checkpoint."""
        return int(self.trajectory.checkpoint_step[self.checkpoint])

    @property
    def weight_decay(self) -> float:
        """The weight decay of the last step before the checkpoint (the lambda of the training
        objective at its weights; at checkpoint 0, that of the first step)."""
        n = self.trajectory.n_steps
        if not n:
            return 0.0
        step = min(max(self.step, 1), n)
        return self.trajectory.settings(step - 1, step)[0].weight_decay

    def at(self, checkpoint: int | None) -> RecordedRun:
        """The same run with the model at another checkpoint (None: the last), on the same
        device."""
        resolved = resolve_checkpoint(self.n_checkpoints, checkpoint)
        if resolved == self.checkpoint:
            return self
        model = scoring_model(self.path, resolved, self.dtype, self.inputs, self.device)
        return dataclasses.replace(self, model=model, checkpoint=resolved)


def scoring_model(
    path: Path,
    checkpoint: int,
    dtype: torch.dtype | None,
    inputs: RunInputs | None,
    device: str | None,
) -> torch.nn.Module:
    """The model at a checkpoint, on `device`, in eval mode: what the baselines score with
    (`RecordedRun`)."""
    model = model_at_checkpoint(path, checkpoint, dtype=dtype, inputs=inputs, device=device)
    return model.eval()


def load_recorded_run(
    path: Path,
    test_set: str,
    inputs: RunInputs | None,
    dtype: torch.dtype | None = None,
    checkpoint: int | None = None,
    device: str | None = None,
) -> RecordedRun:
    """The run of a complete store at a checkpoint (None: the last; negative counts from the
    end), its model on `device` (None: left where it is built, the CPU for a store's own
    model), refusing an unfinished store."""
    require_complete(open_group(path), path)
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    data = load_run_data(path, inputs)
    if len(data.train) != trajectory.n_train:
        raise AnalysisError(
            f"the training split has {len(data.train)} samples but the store records "
            f"n_train={trajectory.n_train}"
        )
    tests = resolve_test_set(path, test_set, run=data)
    resolved = resolve_checkpoint(len(trajectory.checkpoint_step), checkpoint)
    model = scoring_model(path, resolved, dtype, inputs, device)
    return RecordedRun(path, trajectory, data.train, tests, model, resolved, inputs, dtype, device)


def chosen_test_samples(per_test: int | Sequence[int] | None, tests: TestSet) -> np.ndarray:
    """The test samples given per-test contributions: none, the first K, or the given indices
    (checked as reverse mode checks them)."""
    return select_test_samples(per_test, int(tests.targets.shape[0]))


def per_test_gradients(
    run: RecordedRun, chosen: np.ndarray, batch_size: int = 1024
) -> torch.Tensor:
    """The loss gradient of each chosen test sample at the run's weights, (K, P) on the model's
    device, in eval mode (as the mean test-loss gradient u is taken: their mean over all test
    samples is u). The test samples are picked in host memory, where the test set is."""
    index = torch.from_numpy(np.asarray(chosen, dtype=np.int64))
    blocks = [
        per_sample_loss_gradients(
            run.model,
            run.layout,
            run.tests.inputs[index[start : start + batch_size]],
            run.tests.targets[index[start : start + batch_size]],
            run.loss,
        ).detach()
        for start in range(0, int(index.numel()), batch_size)
    ]
    return torch.cat(blocks)


# Directions per vmapped forward-mode pass of `training_dots`.
DIRECTION_BLOCK = 32


def training_dots(
    run: RecordedRun, directions: torch.Tensor, batch_size: int = 1024
) -> torch.Tensor:
    """``g_i . v_k`` for every training sample i and each row v_k of `directions` (K, P): (N, K)
    on the model's device, without forming the per-sample gradients. One direction takes one
    forward-mode pass per batch (`per_sample_directional_derivatives`, as the totals always
    have); K take vmapped passes over blocks of DIRECTION_BLOCK directions."""
    model, layout, train = run.model, run.layout, run.train
    if directions.shape[0] == 1:
        dots = per_sample_directional_derivatives(
            model,
            layout,
            train.inputs,
            train.targets,
            directions[0],
            batch_size=batch_size,
            loss=run.loss,
        )
        return dots[:, None]
    param = next(model.parameters())
    point = get_flat_parameters(model, layout)
    directions = directions.to(point.device, point.dtype)
    n = int(train.targets.shape[0])
    out = torch.empty(n, directions.shape[0], dtype=point.dtype, device=point.device)
    for start in range(0, n, batch_size):
        x = train.inputs[start : start + batch_size].to(param.device, param.dtype)
        y = train.targets[start : start + batch_size].to(param.device)
        losses = per_sample_loss_function(model, layout, x, y, run.loss)

        def dot(v: torch.Tensor, fn=losses) -> torch.Tensor:
            return jvp(fn, (point,), (v,))[1]

        for first in range(0, directions.shape[0], DIRECTION_BLOCK):
            block = directions[first : first + DIRECTION_BLOCK]
            out[start : start + x.shape[0], first : first + block.shape[0]] = vmap(
                dot, randomness="same"
            )(block).T.detach()
    return out


def checkpoint_attrs(run: RecordedRun) -> dict[str, Any]:
    """The attributes saying at which checkpoint a result was computed (`compare`, `validate`
    and the LDS ignore results computed before the last)."""
    return {"checkpoint": run.checkpoint, "step": run.step, "n_checkpoints": run.n_checkpoints}


def computed_before_last(attrs: Mapping[str, Any]) -> bool:
    """Whether a baseline's result group was computed at a checkpoint before the last one."""
    checkpoint, count = attrs.get("checkpoint"), attrs.get("n_checkpoints")
    if not isinstance(checkpoint, int) or not isinstance(count, int):
        return False
    return checkpoint % count != count - 1


def total_arrays(train: Split, values: np.ndarray, long_name: str) -> dict[str, ArraySpec]:
    """`train`, `train_label` (class labels only) and `total_contribution` of a result group."""
    n = int(values.size)
    arrays: dict[str, ArraySpec] = {"train": (np.arange(n, dtype=np.int64), ("train",), {})}
    if not train.targets.is_floating_point():
        arrays["train_label"] = (train.targets.numpy().astype(np.int64), ("train",), {})
    arrays[TOTAL] = (np.asarray(values, dtype=np.float64), ("train",), {"long_name": long_name})
    return arrays


def per_test_arrays(
    tests: TestSet, chosen: np.ndarray, values: np.ndarray | None, long_name: str
) -> dict[str, ArraySpec]:
    """`test` (the chosen test indices), `test_label` (class labels only) and `contribution`
    (train, test) float64: C(i, j) for each chosen test sample j; none when `values` is None
    (no per-test sample was asked for)."""
    if values is None:
        return {}
    arrays: dict[str, ArraySpec] = {"test": (np.asarray(chosen, dtype=np.int64), ("test",), {})}
    if not tests.targets.is_floating_point():
        labels = tests.targets[torch.from_numpy(np.asarray(chosen, dtype=np.int64))]
        arrays["test_label"] = (labels.numpy().astype(np.int64), ("test",), {})
    arrays[PER_TEST] = (
        np.asarray(values, dtype=np.float64),
        ("train", "test"),
        {"long_name": long_name},
    )
    return arrays


def read_total(path: Path, group: str, test_set: str) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """(training indices, C(i), the group's attributes) of `<group>/<test set>`, or None when
    the method has not run on that test set or ran at a checkpoint before the last (its C(i)
    then describes another model than the one `compare` and `validate` judge)."""
    root = open_group(path)
    name = f"{group}/{group_name(test_set)}"
    try:
        node = root[name]
    except KeyError:
        return None
    if TOTAL not in node or computed_before_last(node.attrs):
        return None
    values = np.asarray(node[TOTAL][:], dtype=np.float64)
    index = np.asarray(node["train"][:], dtype=np.int64) if "train" in node else None
    if index is None or index.size != values.size:
        index = np.arange(values.size, dtype=np.int64)
    return index, values, dict(node.attrs)


class BaselineMethod(ContributionMethod):
    """A method beside HyDRA whose group holds `total_contribution (train,)`: its stored C(i)
    are read back under the label `label` makes of the group's attributes."""

    def label(self, attrs: dict[str, Any]) -> str:
        """What `compare` and `validate` show for a stored run with these attributes."""
        raise NotImplementedError

    def totals(self, path: Path, test_set: str) -> Totals:
        found = read_total(path, self.group, test_set)
        if found is None:
            return {}
        index, values, attrs = found
        return {self.label(attrs): (index, values)}


def config_attrs(config: Any) -> dict[str, Any]:
    """A config as its `config` attribute (a tuple of test indices as a list)."""
    attrs = dataclasses.asdict(config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in attrs.items()}


def extremes_lines(values: np.ndarray, count: int = 5) -> list[str]:
    """The most helpful and most harmful training samples, as two summary lines."""
    order = np.argsort(values, kind="stable")
    return [
        "most helpful: " + ", ".join(f"{i} ({values[i]:+.3g})" for i in order[::-1][:count]),
        "most harmful: " + ", ".join(f"{i} ({values[i]:+.3g})" for i in order[:count]),
    ]
