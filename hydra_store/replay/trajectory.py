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
from hydra_store.core.model_state import BufferLayout, check_mask_device, step_randomness
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
        buffers = self.group.attrs.get("buffer_layout")
        self.buffer_layout = BufferLayout.from_attrs(buffers) if buffers else None
        self._seeds = np.asarray(self.group["step_seed"][:]) if "step_seed" in self.group else None
        self._mask_device = (
            self.group["step_seed"].attrs.get("device", "cpu") if self._seeds is not None else None
        )

    def check_mask_device(self, device: torch.device) -> None:
        """Dropout masks drawn from one seed differ between CPU and CUDA generators: a run with
        dropout replays only on the kind of device it was recorded on."""
        check_mask_device(
            self._mask_device,
            device,
            self.path,
            "replay, reverse mode and retraining of this run need",
        )

    def step_seed(self, step: int) -> int | None:
        """The dropout seed of a step (1-based); None when the run drew no masks."""
        return None if self._seeds is None else int(self._seeds[step - 1])

    def buffers(self, checkpoint: int) -> np.ndarray | None:
        """The model's running statistics at a checkpoint (None when it has none)."""
        if self.buffer_layout is None or "buffers" not in self.group:
            return None
        return np.asarray(self.group["buffers"][checkpoint])

    def load_checkpoint(self, model: torch.nn.Module, checkpoint: int) -> None:
        """Give `model` the weights and running statistics of a checkpoint."""
        dtype = next(model.parameters()).dtype
        weights = torch.from_numpy(self.weights(checkpoint)).to(dtype)
        set_flat_parameters(model, self.layout, weights)
        buffers = self.buffers(checkpoint)
        if buffers is not None:
            self.buffer_layout.assign(model, buffers)

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
        self.check_mask_device(device)
        self.load_checkpoint(model, checkpoint)
        model.train()
        settings = self.settings(first, last)
        velocity = torch.from_numpy(self.velocity(checkpoint)).to(device, dtype)
        optimizer = sgd_optimizer(
            model, self.layout, settings[0] if settings else None, velocity if first > 0 else None
        )
        per_sample = PerSampleGradients(model, self.layout, self.loss)
        method = self.group.attrs.get("step_gradient", "per_sample_mean")
        inputs, targets = train.inputs, train.targets

        current = [first]

        def gradient_of(batch: np.ndarray) -> torch.Tensor:
            index = torch.from_numpy(batch)
            x, y = inputs[index].to(device, dtype), targets[index].to(device)
            with step_randomness(self.step_seed(current[0]), device):
                return step_gradients(model, self.layout, per_sample, x, y, method)[1]

        steps = zip(self.batches(first, last), settings, strict=True)
        for k, batch, s in run_steps(model, optimizer, self.layout, steps, gradient_of):
            current[0] = first + k + 1
            yield Step(first + k + 1, batch, s, get_flat_parameters(model, self.layout))
        if check:
            self._check_checkpoint(model, checkpoint + 1, f"steps {first + 1}..{last}", rtol)

    def _check_checkpoint(self, model, checkpoint: int, replayed_steps: str, rtol: float) -> None:
        """The replayed weights (and running statistics) must be the stored checkpoint's."""
        pairs = [
            (
                "",
                get_flat_parameters(model, self.layout).cpu().numpy(),
                self.weights(checkpoint),
            )
        ]
        stored_buffers = self.buffers(checkpoint)
        if stored_buffers is not None:
            pairs.append(
                ("the running statistics of ", self.buffer_layout.flatten(model), stored_buffers)
            )
        for what, replayed, stored in pairs:
            scale = max(1.0, float(np.abs(stored).max())) if stored.size else 1.0
            error = float(np.abs(replayed - stored).max()) / scale if stored.size else 0.0
            if not np.isfinite(error) or error > rtol:
                raise ReplayMismatchError(
                    f"replaying {replayed_steps} from checkpoint {checkpoint - 1} does not "
                    f"reproduce {what}checkpoint {checkpoint} (max relative difference "
                    f"{error:.2e}); the store's trajectory or data does not match its weights"
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
