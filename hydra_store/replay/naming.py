"""Naming the data set and model of a store recorded from a user's loop without them
(`hydra-store analyze STORE --dataset ... --model ...`), so that the analysers can rebuild them.

The names are checked before they are kept: the data set must have the store's number of
training samples, the model the store's parameter layout, and replaying the first recorded
segment with them must reproduce the stored checkpoint, which only the data actually trained on
does. Only then are the specs written into the store's `config` (and the data set's fingerprints
into `dataset`), so that later commands need no names.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hydra_store.core.parameters import ParameterLayout
from hydra_store.data.datasets import DatasetBundle, Split, load_dataset
from hydra_store.data.models import build_model
from hydra_store.data.training_data import dataset_attrs
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import consolidate, open_group


def load_named_run(
    dataset_spec: str,
    model_spec: str,
    *,
    n_train: int,
    layout: ParameterLayout,
    seed: int,
    data_root: str | None,
    dtype: torch.dtype,
    trained: str,
) -> tuple[DatasetBundle, torch.nn.Module]:
    """Load the named data set and build the named model, refusing them unless the data set has
    `n_train` training samples and the model the parameter layout `layout` (of the model
    `trained`: "being trained", "recorded in <store>")."""
    bundle = load_dataset(dataset_spec, data_root=data_root, seed=seed)
    if len(bundle.train.targets) != n_train:
        raise InvalidArgumentError(
            f"the data set {dataset_spec!r} has {len(bundle.train.targets)} training samples; "
            f"the model {trained} was trained on {n_train}"
        )
    model = build_model(
        model_spec,
        input_shape=tuple(bundle.input_shape),
        n_classes=len(bundle.class_names),
        seed=seed,
        dtype=dtype,
    )
    if ParameterLayout.from_model(model) != layout:
        raise InvalidArgumentError(
            f"the model {model_spec!r} builds a different parameter layout than the model "
            f"{trained}; name the function that builds that model"
        )
    return bundle, model


def name_recorded_run(
    path: str | os.PathLike[str],
    dataset_spec: str | None,
    model_spec: str | None,
    *,
    seed: int = 0,
    data_root: str | None = None,
) -> bool:
    """Give a store that names no data set and model the given ones, after checking them by
    replay; True if the store was changed. A store that names them already keeps its own (and
    refuses different ones)."""
    if dataset_spec is None and model_spec is None:
        return False
    group = open_group(path)
    config = dict(group.attrs.get("config") or {})
    if "dataset" in config and "model" in config:
        if (dataset_spec, model_spec) not in ((config["dataset"], config["model"]),):
            raise InvalidArgumentError(
                f"{path} was recorded with --dataset {config['dataset']!r} --model "
                f"{config['model']!r}; drop --dataset/--model, the store names them already"
            )
        return False
    if dataset_spec is None or model_spec is None:
        raise InvalidArgumentError("give both --dataset and --model for a store that names neither")
    bundle, model = load_named_run(
        dataset_spec,
        model_spec,
        n_train=int(group.attrs["n_train"]),
        layout=ParameterLayout.from_attrs(group.attrs["parameter_layout"]),
        seed=seed,
        data_root=data_root,
        dtype=torch.float32,
        trained=f"recorded in {path}",
    )
    named = {
        "dataset": dataset_spec,
        "model": model_spec,
        "seed": seed,
        "data_root": data_root,
    }
    _check_by_replay(path, named, bundle.train, model)
    writable = open_group(path, mode="r+")
    writable.attrs["config"] = {**config, **named, "named_after_recording": True}
    writable.attrs["dataset"] = dataset_attrs(bundle, bundle.train.targets.numpy())
    consolidate(path)
    return True


def _check_by_replay(path, named: dict, train: Split, model: torch.nn.Module) -> None:
    """Replay the first segment from checkpoint 0 with the named data and model; it must
    reproduce checkpoint 1 (replay_segment loads checkpoint 0's weights into the model)."""
    trajectory = Trajectory(path)
    if len(trajectory.checkpoint_step) < 2:
        return
    dtype = torch.float64 if trajectory.weights(0).dtype == np.float64 else torch.float32
    try:
        for _ in trajectory.replay_segment(model.to(dtype), train, 0, check=True):
            pass
    except ReplayMismatchError:
        raise InvalidArgumentError(
            f"replaying {path} with the data set {named['dataset']!r} and the model "
            f"{named['model']!r} does not reproduce its first checkpoint: these are not the data "
            "(in the order the batches index) and model it was trained on"
        ) from None
