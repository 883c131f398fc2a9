"""A recorded run rebuilt from its store, or given in Python: the exact training and test data
(checked against the recorded fingerprints and per-sample digests) and the model at any
checkpoint.

A built-in run's store names its data set and model, so the store path is all an analyser
needs. A run recorded around a user's own loop may name neither; then the model, the data and
(optionally) the loss are given in Python as `RunInputs`, and every analyser takes them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from hydra_store.arguments import RecordConfig
from hydra_store.core.fingerprints import sample_digests
from hydra_store.core.losses import LossFunction, PerSampleLoss
from hydra_store.core.model_state import BufferLayout
from hydra_store.core.parameters import ParameterLayout, set_flat_parameters
from hydra_store.data.datasets import DatasetBundle, Split, fingerprint
from hydra_store.data.models import build_model
from hydra_store.data.training_data import load_training_data
from hydra_store.errors import (
    DatasetError,
    InvalidArgumentError,
    ReplayMismatchError,
    StoreFormatError,
)
from hydra_store.rng import GLOBAL_RNG_LOCK
from hydra_store.store.format import open_group


@dataclass(frozen=True, eq=False)
class RunInputs:
    """The model, data and loss of a recorded run, given in Python.

    Args:
        model: the network (its architecture; the weights come from the store), or a function
            of no arguments that builds it.
        train: the whole training set, in the order the recorder's batch indices index it: a
            `torch.utils.data.Dataset` whose items start with (input, target) (an
            `IndexedDataset` works as is), or a pair (inputs, targets) of tensors or arrays.
        test: the test set the analyses are about, in the same forms.
        loss: the per-sample loss (default: the one the store names; needed when the store's
            loss has no import name). See `hydra_store.core.losses`.
        class_names: names of the classes, for figures (default: the store's, or 0..C-1).

    The training data is checked against the store before use: its size, its fingerprint when
    the store has one, and each sample the recording drew against the digest taken then.
    Compared by identity, so it can key caches; picklable when its model is (to run on
    dask.distributed workers).
    """

    model: torch.nn.Module | Callable[[], torch.nn.Module]
    train: Any
    test: Any
    loss: str | PerSampleLoss | LossFunction | None = None
    class_names: Sequence[str] | None = None

    def build_model(self, dtype: torch.dtype) -> torch.nn.Module:
        """A fresh copy of the model in `dtype` (the given module is never modified)."""
        if isinstance(self.model, torch.nn.Module):
            model = copy.deepcopy(self.model)
        elif callable(self.model):
            # Under the generator's lock, in a fork of it: a factory that seeds torch (as
            # model code often does) must not move the dropout masks another thread is
            # drawing under its step's seed, nor the caller's generator.
            with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
                model = self.model()
        else:
            raise InvalidArgumentError(
                "RunInputs.model must be a torch.nn.Module or a function that builds one, got "
                f"{type(self.model).__name__}"
            )
        if not isinstance(model, torch.nn.Module):
            raise InvalidArgumentError(
                f"RunInputs.model() returned a {type(model).__name__}, not a torch.nn.Module"
            )
        return model.to(dtype=dtype)


def as_split(data: Any, what: str) -> Split:
    """A Split of (inputs, targets) given as a pair of tensors or arrays, a Split, or a
    map-style Dataset whose items start with (input, target)."""
    if isinstance(data, Split):
        return data
    if isinstance(data, tuple | list) and len(data) == 2:
        inputs, targets = (
            torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in data
        )
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        items = [data[i] for i in range(len(data))]
        if not items or not all(isinstance(it, tuple | list) and len(it) >= 2 for it in items):
            raise InvalidArgumentError(
                f"the {what} data set must be non-empty and yield (input, target, ...) items"
            )
        inputs = torch.stack([torch.as_tensor(it[0]) for it in items])
        targets = torch.stack([torch.as_tensor(it[1]) for it in items])
    else:
        raise InvalidArgumentError(
            f"the {what} data must be a torch Dataset or a pair (inputs, targets), got "
            f"{type(data).__name__}"
        )
    inputs = inputs.detach().cpu()
    if inputs.dtype != torch.float64:
        inputs = inputs.to(torch.float32)
    targets = targets.detach().cpu()
    targets = targets if targets.is_floating_point() else targets.to(torch.int64)
    try:
        return Split(inputs, targets, np.arange(int(inputs.shape[0]), dtype=np.int64))
    except DatasetError as error:
        raise InvalidArgumentError(f"the {what} data: {error}") from None


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


def load_run_data(path: str | Path, inputs: RunInputs | None = None) -> RunData:
    """Rebuild the training and test data of a recorded run (or take those of `inputs`) and
    check them against the store."""
    group = open_group(path)
    if inputs is not None:
        return _given_run_data(path, group, inputs)
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


def _given_run_data(path: str | Path, group: zarr.Group, inputs: RunInputs) -> RunData:
    """The data of `inputs` as a RunData, after checking the training set against the store."""
    train = as_split(inputs.train, "training")
    test = as_split(inputs.test, "test")
    n_train = int(group.attrs["n_train"])
    if len(train) != n_train:
        raise InvalidArgumentError(
            f"the training data given has {len(train)} samples; the run recorded in {path} was "
            f"trained on {n_train}"
        )
    info = group.attrs.get("dataset") or {}
    recorded = info.get("train_fingerprint")
    as_recorded = Split(train.inputs.to(torch.float32), train.targets, train.source_index)
    if recorded is not None and fingerprint(as_recorded) != recorded:
        raise ReplayMismatchError(
            f"the training data given differs from the data recorded in {path} (fingerprints "
            "differ); pass the training set the run was trained on, in its order"
        )
    if "train_digest" in group:
        dtype = torch.float64 if group["weights"].dtype == np.float64 else torch.float32
        _check_digests(path, np.asarray(group["train_digest"][:]), train, dtype)
    regression = train.targets.is_floating_point()
    if regression:
        names: tuple[str, ...] = ()
    elif inputs.class_names is not None:
        names = tuple(str(c) for c in inputs.class_names)
    elif info.get("class_names"):
        names = tuple(info["class_names"])
    else:
        top = max(int(train.targets.max()), int(test.targets.max()))
        names = tuple(str(c) for c in range(max(2, top + 1)))
    shape = tuple(int(s) for s in train.inputs.shape[1:])
    try:
        bundle = DatasetBundle(
            name="given in Python",
            train=train,
            test=test,
            validation=None,
            class_names=names,
            input_shape=shape,
            is_image=len(shape) == 3,
        )
    except DatasetError as error:
        raise InvalidArgumentError(f"the data given: {error}") from None
    return RunData(bundle=bundle, train=train)


def _check_digests(path, recorded: np.ndarray, train: Split, dtype: torch.dtype) -> None:
    """Every sample the recording drew must have the digest it had then."""
    seen = np.nonzero(recorded != 0)[0]
    block = 4096
    for start in range(0, seen.size, block):
        index = seen[start : start + block]
        chosen = torch.from_numpy(index)
        given = sample_digests(train.inputs[chosen].to(dtype), train.targets[chosen])
        differ = np.nonzero(given != recorded[index])[0]
        if differ.size:
            raise ReplayMismatchError(
                f"the training data given differs from the data recorded in {path}: sample "
                f"{int(index[differ[0]])} (and {differ.size - 1} more of the first "
                f"{start + index.size} drawn) is not what training drew at that index; pass "
                "the training set the run was trained on, in the order its batch indices index"
            )


def build_recorded_model(
    path: str | Path, dtype: torch.dtype | None = None, inputs: RunInputs | None = None
) -> torch.nn.Module:
    """The recorded architecture with its initial weights (checkpoint 0)."""
    return model_at_checkpoint(path, 0, dtype=dtype, inputs=inputs)


def model_at_checkpoint(
    path: str | Path,
    checkpoint: int = -1,
    *,
    dtype: torch.dtype | None = None,
    inputs: RunInputs | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """The recorded model with the weights and running statistics of a checkpoint (default: the
    last one), in training mode; built by `inputs` when given, else from the store's config.
    `device`: where it is moved once its state is set (None: left where it was built)."""
    group = open_group(path)
    weights = group["weights"]
    n_checkpoints = weights.shape[0]
    if not -n_checkpoints <= checkpoint < n_checkpoints:
        raise InvalidArgumentError(
            f"checkpoint {checkpoint} does not exist; the store has checkpoints 0..{n_checkpoints - 1}"
        )
    stored = np.asarray(weights[checkpoint])
    dtype = dtype or (torch.float64 if stored.dtype == np.float64 else torch.float32)
    if inputs is not None:
        model = inputs.build_model(dtype)
        origin = "the model given"
    else:
        config = recorded_config(group)
        info = group.attrs.get("dataset") or {}
        model = build_model(
            config.model,
            input_shape=tuple(info["input_shape"]),
            n_classes=len(info["class_names"]),
            seed=config.seed,
            dtype=dtype,
        )
        origin = "the model rebuilt from the store's config"
    layout = ParameterLayout.from_model(model)
    recorded = ParameterLayout.from_attrs(group.attrs["parameter_layout"])
    if layout != recorded:
        error = InvalidArgumentError if inputs is not None else StoreFormatError
        raise error(
            f"{origin} has a different parameter layout than the one recorded in {path} "
            f"({layout.n_params} parameters against {recorded.n_params}); give the model "
            "that was trained"
        )
    set_flat_parameters(model, layout, torch.from_numpy(stored).to(dtype))
    buffer_attrs = group.attrs.get("buffer_layout")
    if buffer_attrs and "buffers" in group:
        buffer_layout = BufferLayout.from_attrs(buffer_attrs)
        if BufferLayout.from_model(model) != buffer_layout:
            raise InvalidArgumentError(
                f"{origin} has other buffers (running statistics) than the model recorded in "
                f"{path}; give the model that was trained"
            )
        buffer_layout.assign(model, np.asarray(group["buffers"][checkpoint]))
    return model if device is None else model.to(device)
