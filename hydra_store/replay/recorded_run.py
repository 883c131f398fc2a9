"""A recorded run rebuilt from its store: the exact training and test data (checked against
the recorded fingerprints) and the model at any checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from hydra_store.arguments import RecordConfig
from hydra_store.core.parameters import ParameterLayout, set_flat_parameters
from hydra_store.data.datasets import DatasetBundle, Split, fingerprint
from hydra_store.data.models import build_model
from hydra_store.data.training_data import load_training_data
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError, StoreFormatError
from hydra_store.store.format import open_group


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
            "this store was recorded from a user training loop that named no data set and model; "
            "name them once with --dataset and --model (e.g. `hydra-store analyze STORE "
            "--dataset pkg.data:load --model pkg.nets:build`), or record with "
            "HydraRecorder(..., dataset_spec=, model_spec=)"
        )
    try:
        recorded = RecordConfig.from_attrs(config)
        recorded.validate()
    except (TypeError, ValueError, AttributeError) as error:
        raise StoreFormatError(
            f"the store's `config` attribute is malformed ({error}); the store is damaged. "
            "Record it again"
        ) from None
    return recorded


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
