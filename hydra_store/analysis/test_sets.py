"""Resolve the test set an analysis asks about: a split of the recorded run, or another data set
of the same input shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from hydra_store.data.datasets import Split, load_dataset
from hydra_store.errors import AnalysisError
from hydra_store.replay.recorded_run import RunData, load_run_data, recorded_config


@dataclass(frozen=True)
class TestSet:
    """A named set of test samples (name is used as the analysis group name)."""

    __test__ = False  # not a pytest test class

    name: str
    split: Split
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    is_image: bool

    @property
    def inputs(self) -> torch.Tensor:
        return self.split.inputs

    @property
    def targets(self) -> torch.Tensor:
        return self.split.targets


def group_name(spec: str) -> str:
    """A store-safe group name for a test-set spec ('test', 'validation', or a sanitised spec)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(spec).stem or spec)
    return cleaned.strip("._") or "test_set"


def resolve_test_set(path: str | Path, spec: str = "test", run: RunData | None = None) -> TestSet:
    """'test' or 'validation' of the recorded run, or any data-set spec of the same input shape
    (its own test split is used)."""
    run = run or load_run_data(path)
    bundle = run.bundle
    if spec == "test":
        split = bundle.test
    elif spec == "validation":
        if bundle.validation is None:
            raise AnalysisError(
                f"the run recorded in {path} has no validation split; use --test-set test, or "
                "record with --validation-fraction"
            )
        split = bundle.validation
    else:
        from hydra_store.store.format import open_group

        config = recorded_config(open_group(path))
        other = load_dataset(spec, data_root=config.data_root, seed=config.seed)
        if tuple(other.input_shape) != tuple(bundle.input_shape):
            raise AnalysisError(
                f"test set {spec!r} has inputs of shape {tuple(other.input_shape)} but the model "
                f"was trained on {tuple(bundle.input_shape)}; use a data set of the same shape"
            )
        if len(other.class_names) != len(bundle.class_names):
            raise AnalysisError(
                f"test set {spec!r} has {len(other.class_names)} classes, the model "
                f"{len(bundle.class_names)}"
            )
        split = other.test
    return TestSet(
        name=group_name(spec),
        split=split,
        class_names=bundle.class_names,
        input_shape=tuple(bundle.input_shape),
        is_image=bundle.is_image,
    )
