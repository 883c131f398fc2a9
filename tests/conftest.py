"""Shared tiny runs. Session-scoped: recorded once, read by many tests (never modified in place;
tests that write copy the store first)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hydra_store.arguments import RecordConfig
from hydra_store.recording.training import record_run


def tiny_config(out: Path, **overrides) -> RecordConfig:
    """digits, an MLP, 3 epochs, momentum, weight decay and a step decay: seconds to record."""
    values = dict(
        dataset="digits",
        model="mlp:hidden=16",
        epochs=3,
        batch_size=64,
        lr=0.1,
        lr_step_epochs=2,
        out=str(out),
    )
    values.update(overrides)
    return RecordConfig(**values)


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory) -> Path:
    """A complete store: digits, all 1,437 training samples tracked."""
    out = tmp_path_factory.mktemp("stores") / "digits.zarr"
    record_run(tiny_config(out))
    return out


@pytest.fixture(scope="session")
def noisy_digits_store(tmp_path_factory) -> Path:
    """digits with 50% of the training labels reassigned to wrong classes, 10 epochs."""
    out = tmp_path_factory.mktemp("stores") / "noisy.zarr"
    record_run(tiny_config(out, label_noise=0.5, epochs=10, lr_step_epochs=8))
    return out


@pytest.fixture()
def store_copy(digits_store, tmp_path) -> Path:
    """A private copy of the digits store for tests that write into it."""
    target = tmp_path / "copy.zarr"
    shutil.copytree(digits_store, target)
    return target
