"""Rebuild what a store recorded: the model at a checkpoint, the exact training and test data,
and the training trajectory itself, replayed step by step from the stored checkpoints, batches
and learning rates (and checked against the stored weights)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from hydra_store.config import RecordConfig
from hydra_store.data import DatasetBundle, Split, fingerprint
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError, StoreFormatError
from hydra_store.hypergradient import PerSampleGradients, SGDSettings
from hydra_store.models import build_model
from hydra_store.parameters import ParameterLayout, get_flat_parameters, set_flat_parameters
from hydra_store.recorder import sgd_step, step_gradients
from hydra_store.store import open_group
from hydra_store.training import load_training_data


@dataclass(frozen=True)
class RunData:
    """The data of a recorded run, exactly as trained on (labels after injected noise)."""

    bundle: DatasetBundle
    train: Split  # inputs and the labels used in training

    @property
    def n_classes(self) -> int:
        return len(self.bundle.class_names)


def recorded_config(group: zarr.Group) -> RecordConfig:
    config = group.attrs.get("config") or {}
    if "dataset" not in config or "model" not in config:
        raise StoreFormatError(
            "this store was recorded from a user training loop and does not name its data set "
            "and model; rebuild them in your own code and pass them explicitly"
        )
    return RecordConfig.from_attrs(config)


def load_run_data(path: str | Path) -> RunData:
    """Rebuild the training and test data of a recorded run and check them against the store."""
    group = open_group(path)
    config = recorded_config(group)
    bundle, noisy, _ = load_training_data(config)
    train = Split(bundle.train.inputs, torch.from_numpy(noisy), bundle.train.source_index)
    recorded = (group.attrs.get("dataset") or {}).get("train_fingerprint")
    if recorded is not None and fingerprint(train) != recorded:
        raise ReplayMismatchError(
            f"the data set {config.dataset!r} rebuilt here differs from the one recorded in "
            f"{path} (fingerprints differ); check --data-root and the data files"
        )
    return RunData(bundle=bundle, train=train)


def build_recorded_model(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The recorded architecture with its initial weights (checkpoint 0)."""
    return model_at_checkpoint(path, 0, dtype=dtype)


def model_at_checkpoint(
    path: str | Path, checkpoint: int = -1, *, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """The recorded model with the weights of a checkpoint (default: the last one)."""
    group = open_group(path)
    config = recorded_config(group)
    info = group.attrs.get("dataset") or {}
    weights = group["weights"]
    n_checkpoints = weights.shape[0]
    if not -n_checkpoints <= checkpoint < n_checkpoints:
        raise InvalidArgumentError(
            f"checkpoint {checkpoint} does not exist; the store has checkpoints 0..{n_checkpoints - 1}"
        )
    stored = np.asarray(weights[checkpoint])
    dtype = dtype or (torch.float64 if stored.dtype == np.float64 else torch.float32)
    model = build_model(
        config.model,
        input_shape=tuple(info["input_shape"]),
        n_classes=len(info["class_names"]),
        seed=config.seed,
        dtype=dtype,
    )
    layout = ParameterLayout.from_model(model)
    recorded = ParameterLayout.from_attrs(group.attrs["parameter_layout"])
    if layout != recorded:
        raise StoreFormatError(
            "the model rebuilt from the store's config has a different parameter layout than "
            "the one recorded"
        )
    set_flat_parameters(model, layout, torch.from_numpy(stored).to(dtype))
    return model


@dataclass(frozen=True)
class Step:
    """One recorded SGD step: the batch and coefficients it used, and w_{t-1} before it."""

    step: int  # 1-based
    batch_index: np.ndarray
    settings: SGDSettings
    weights_before: torch.Tensor


class Trajectory:
    """The recorded trajectory of a store, read segment by segment between checkpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.group = open_group(path)
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
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=settings[0].lr if settings else 0.1,
            momentum=settings[0].momentum if settings else 0.0,
            weight_decay=settings[0].weight_decay if settings else 0.0,
        )
        velocity = torch.from_numpy(self.velocity(checkpoint)).to(device, dtype)
        if settings and settings[0].momentum != 0 and first > 0:
            named = dict(model.named_parameters())
            for name, view in self.layout.unflatten(velocity).items():
                optimizer.state[named[name]]["momentum_buffer"] = view.clone()
        per_sample = PerSampleGradients(model, self.layout)
        method = self.group.attrs.get("step_gradient", "per_sample_mean")
        inputs, targets = train.inputs, train.targets
        for k, (batch, s) in enumerate(zip(self.batches(first, last), settings, strict=True)):
            for group in optimizer.param_groups:
                group.update(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
            weights_before = get_flat_parameters(model, self.layout)
            yield Step(first + k + 1, batch, s, weights_before)
            index = torch.from_numpy(batch)
            _, gradients = step_gradients(
                model,
                self.layout,
                per_sample,
                inputs[index].to(device, dtype),
                targets[index].to(device),
                method,
            )
            sgd_step(model, optimizer, self.layout, gradients)
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
