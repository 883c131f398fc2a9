"""The recorded training trajectory, replayed step by step from the stored checkpoints,
batches and learning rates, and checked against the stored weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hydra_store.core.gradients import PerSampleGradients, step_gradients
from hydra_store.core.losses import LossFunction, PerSampleLoss, recorded_loss
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters, set_flat_parameters
from hydra_store.core.sgd import SGDSettings, run_steps, sgd_optimizer
from hydra_store.data.datasets import Split
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError
from hydra_store.replay.recorded_run import build_recorded_model, load_run_data
from hydra_store.store.format import open_group
from hydra_store.store.location import store_path


@dataclass(frozen=True)
class Step:
    """One recorded SGD step: the batch and coefficients it used, and w_{t-1} before it."""

    step: int  # 1-based
    batch_index: np.ndarray
    settings: SGDSettings
    weights_before: torch.Tensor


class Trajectory:
    """The recorded trajectory of a store, read segment by segment between checkpoints.

    `loss` is the per-sample training loss replay takes (default: the one the store names;
    core/losses.py `recorded_loss`)."""

    def __init__(
        self, path: str | Path, loss: str | PerSampleLoss | LossFunction | None = None
    ) -> None:
        self.path = store_path(path)
        self.group = open_group(path)
        self.loss = recorded_loss(self.group.attrs.get("loss"), loss)
        self.checkpoint_step = np.asarray(self.group["checkpoint_step"][:])
        self.n_steps = int(self.group["lr"].shape[0])
        self.n_train = int(self.group.attrs["n_train"])
        self.layout = ParameterLayout.from_attrs(self.group.attrs["parameter_layout"])

    def settings(self, start: int, stop: int) -> list[SGDSettings]:
        """Settings of steps start+1..stop (0-based slice [start, stop) of the step axis)."""
        lr = self.group["lr"][start:stop]
        momentum = self.group["momentum"][start:stop]
        decay = self.group["weight_decay"][start:stop]
        return [
            SGDSettings(float(a), float(b), float(c))
            for a, b, c in zip(lr, momentum, decay, strict=True)
        ]

    def batches(self, start: int, stop: int) -> list[np.ndarray]:
        block = np.asarray(self.group["batch_index"][start:stop])
        return [row[row >= 0] for row in block]

    def weights(self, checkpoint: int) -> np.ndarray:
        return np.asarray(self.group["weights"][checkpoint])

    def velocity(self, checkpoint: int) -> np.ndarray:
        return np.asarray(self.group["velocity"][checkpoint])

    def replay_segment(
        self,
        model: torch.nn.Module,
        train: Split,
        checkpoint: int,
        *,
        check: bool = True,
        rtol: float = 1e-5,
    ) -> Iterator[Step]:
        """Replay the steps from `checkpoint` to the next one, yielding each step before it is
        taken; afterwards `model` holds the weights at the next checkpoint.

        With `check`, the replayed weights must match the next stored checkpoint, or
        ReplayMismatchError is raised.
        """
        if not 0 <= checkpoint < len(self.checkpoint_step) - 1:
            raise InvalidArgumentError(
                f"checkpoint {checkpoint} starts no segment; the store has checkpoints "
                f"0..{len(self.checkpoint_step) - 1}"
            )
        first, last = (
            int(self.checkpoint_step[checkpoint]),
            int(self.checkpoint_step[checkpoint + 1]),
        )
        param = next(model.parameters())
        dtype, device = param.dtype, param.device
        set_flat_parameters(
            model, self.layout, torch.from_numpy(self.weights(checkpoint)).to(dtype)
        )
        settings = self.settings(first, last)
        velocity = torch.from_numpy(self.velocity(checkpoint)).to(device, dtype)
        optimizer = sgd_optimizer(
            model, self.layout, settings[0] if settings else None, velocity if first > 0 else None
        )
        per_sample = PerSampleGradients(model, self.layout, self.loss)
        method = self.group.attrs.get("step_gradient", "per_sample_mean")
        inputs, targets = train.inputs, train.targets

        def gradient_of(batch: np.ndarray) -> torch.Tensor:
            index = torch.from_numpy(batch)
            x, y = inputs[index].to(device, dtype), targets[index].to(device)
            return step_gradients(model, self.layout, per_sample, x, y, method)[1]

        steps = zip(self.batches(first, last), settings, strict=True)
        for k, batch, s in run_steps(model, optimizer, self.layout, steps, gradient_of):
            yield Step(first + k + 1, batch, s, get_flat_parameters(model, self.layout))
        if check:
            replayed = get_flat_parameters(model, self.layout).cpu().numpy()
            stored = self.weights(checkpoint + 1)
            scale = max(1.0, float(np.abs(stored).max()))
            error = float(np.abs(replayed - stored).max()) / scale
            if not np.isfinite(error) or error > rtol:
                raise ReplayMismatchError(
                    f"replaying steps {first + 1}..{last} from checkpoint {checkpoint} does not "
                    f"reproduce checkpoint {checkpoint + 1} (max relative difference {error:.2e}); "
                    "the store's trajectory or data does not match its weights"
                )


def replay_training(
    path: str | Path, *, check: bool = True, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Replay the whole recorded training from the initial weights; return the final weights.

    Every segment is checked against its stored checkpoint when `check` is set.
    """
    trajectory = Trajectory(path)
    model = build_recorded_model(path, dtype=dtype)
    data = load_run_data(path)
    for checkpoint in range(len(trajectory.checkpoint_step) - 1):
        for _ in trajectory.replay_segment(model, data.train, checkpoint, check=check):
            pass
    return get_flat_parameters(model, trajectory.layout)
