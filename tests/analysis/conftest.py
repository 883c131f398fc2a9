"""Analysed copies of the shared stores, made once per session (figures off: they are tested
once, in tests/cli/test_analyze.py), and the float64 store of the reverse-mode tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hydra_store.analysis.stored import analyze
from hydra_store.arguments import AnalyzeConfig
from tests.analysis.test_reverse import float64_run  # noqa: F401  (shared fixture)


@pytest.fixture(scope="session")
def analysed_store(digits_store, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("analysed") / "digits.zarr"
    shutil.copytree(digits_store, target)
    analyze(target, AnalyzeConfig(figures=False, top_k=5))
    return target


@pytest.fixture(scope="session")
def analysed_noisy_store(noisy_digits_store, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("analysed") / "noisy.zarr"
    shutil.copytree(noisy_digits_store, target)
    summary = analyze(target, AnalyzeConfig(figures=False))
    assert summary.noise is not None
    return target


def spy_on_model_devices(monkeypatch, *modules) -> list:
    """The `device` of every `model_at_checkpoint` call made through `modules` (each module's
    imported name is patched) from now on."""
    from hydra_store.replay import recorded_run

    seen = []
    original = recorded_run.model_at_checkpoint

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return original(*args, **kwargs)

    for module in modules:
        monkeypatch.setattr(module, "model_at_checkpoint", spy)
    return seen
