"""A user's training loop whose data set and model are named by specs, so that its store can be
replayed and analysed like a built-in run.

`HydraRecorder(..., dataset_spec="mypkg.data:load", model_spec="mypkg.nets:build")` loads the
data set and builds the model from their specs once, before anything is written: the data set's
training split must be the one the loop's indices index, and the model's parameter layout must
be the one trained. The store then holds both specs in its `config` and the data set's
fingerprints in `dataset`, which is all that `analyze`, reverse mode, `compare` and `validate`
need. Every step's batch is checked against the named data set (the samples at the batch's
indices), so a loop that transforms its data, or whose indices index something else, is refused
at its first step instead of producing a store that replays to different numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hydra_store.core.parameters import ParameterLayout
from hydra_store.data.datasets import DatasetBundle
from hydra_store.data.training_data import dataset_attrs
from hydra_store.errors import InvalidArgumentError
from hydra_store.replay.naming import load_named_run


@dataclass(frozen=True)
class NamedRun:
    """The rebuilt data set of a named run, and what the store records of it."""

    bundle: DatasetBundle
    config: dict[str, Any]
    dataset_attrs: dict[str, Any]

    @property
    def train_labels(self) -> np.ndarray:
        return self.bundle.train.targets.numpy()

    def check_batch(
        self, inputs: torch.Tensor, targets: torch.Tensor, index: np.ndarray, step: int
    ) -> None:
        """Refuse a batch that is not the named data set's samples at `index`."""
        train = self.bundle.train
        expected_targets = train.targets[torch.from_numpy(index)]
        if not torch.equal(targets.detach().cpu().to(expected_targets.dtype), expected_targets):
            raise InvalidArgumentError(
                f"step {step}: the batch's targets are not those of the data set "
                f"{self.config['dataset']!r} at its indices; the indices must index that data "
                "set's training split, in its order"
            )
        expected = train.inputs[torch.from_numpy(index)]
        given = inputs.detach().cpu().to(expected.dtype)
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        if given.shape != expected.shape or not torch.allclose(
            given, expected, rtol=0.0, atol=1e-6 * scale
        ):
            raise InvalidArgumentError(
                f"step {step}: the batch's inputs differ from those of the data set "
                f"{self.config['dataset']!r} at its indices; the data set spec must give "
                "exactly the tensors trained on (no augmentation or normalisation outside it)"
            )


def resolve_named_run(
    model: torch.nn.Module,
    n_train: int,
    *,
    dataset_spec: str | None,
    model_spec: str | None,
    seed: int,
    data_root: str | None,
    sgd: Mapping[str, float],
) -> NamedRun | None:
    """Load and check the named data set and model (None when the run names neither)."""
    if dataset_spec is None and model_spec is None:
        return None
    if dataset_spec is None or model_spec is None:
        raise InvalidArgumentError(
            "name both the data set and the model (dataset_spec= and model_spec=), or neither"
        )
    bundle, _ = load_named_run(
        dataset_spec,
        model_spec,
        n_train=n_train,
        layout=ParameterLayout.from_model(model),
        seed=seed,
        data_root=data_root,
        dtype=next(model.parameters()).dtype,
        trained="being trained",
    )
    config = {
        "dataset": dataset_spec,
        "model": model_spec,
        "seed": seed,
        "data_root": data_root,
        "source": "user training loop",
        **{name: float(value) for name, value in sgd.items()},
    }
    attrs = dataset_attrs(bundle, bundle.train.targets.numpy())
    return NamedRun(bundle=bundle, config=config, dataset_attrs=attrs)
