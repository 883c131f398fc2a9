"""One arguments dataclass per stage: validated before anything runs, saved beside its outputs,
and the CLI's defaults are the dataclasses' own."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from hydra_store.arguments import (
    AnalyzeConfig,
    CompareConfig,
    LdsConfig,
    RecordConfig,
    ReverseConfig,
    ValidateConfig,
    resolve_config,
)
from hydra_store.errors import InvalidArgumentError
from hydra_store_cli.main import app


def command_defaults(name: str) -> dict[str, object]:
    command = typer.main.get_command(app).commands[name]
    return {p.name: p.default for p in command.params if not p.required}


@pytest.mark.parametrize(
    ("command", "config", "renamed"),
    [
        ("record", RecordConfig(), {}),
        ("compare", CompareConfig(), {"over_checkpoints": "checkpoints"}),
        ("validate", ValidateConfig(), {}),
        ("analyze", AnalyzeConfig(), {}),
    ],
)
def test_cli_defaults_are_the_configs_defaults(command, config, renamed):
    defaults = command_defaults(command)
    checked = 0
    for field in dataclasses.fields(config):
        option = renamed.get(field.name, field.name)
        if option in defaults:
            value = defaults[option]
            expected = getattr(config, field.name)
            assert (str(value) if field.name == "out" else value) == expected, field.name
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (AnalyzeConfig(top_k=0), "--top-k must be at least 1"),
        (ReverseConfig(per_test=0), "--per-test must be at least 1"),
        (CompareConfig(every=0), "--every must be at least 1"),
        (ValidateConfig(samples=0), "--samples must be at least 1"),
        (ValidateConfig(selection="best"), "--selection must be one of random"),
    ],
)
def test_bad_arguments_are_refused(config, message):
    with pytest.raises(InvalidArgumentError, match=message):
        config.validate()


def test_resolve_config_takes_a_dataclass_or_keywords():
    assert resolve_config(CompareConfig, "validation", {"every": 3}) == CompareConfig(
        test_set="validation", every=3
    )
    config = CompareConfig(every=2)
    assert resolve_config(CompareConfig, config, {}) is config
    with pytest.raises(InvalidArgumentError, match="not both"):
        resolve_config(CompareConfig, config, {"every": 3})


@pytest.mark.parametrize("kind", [AnalyzeConfig, ReverseConfig, ValidateConfig, LdsConfig])
def test_the_analysers_device_is_checked(kind, monkeypatch):
    """None (the CPU), "cpu" or "cuda"; "cuda" only where torch sees a GPU, in RecordConfig's
    words."""
    import torch

    kind().validate()
    kind(device="cpu").validate()
    with pytest.raises(InvalidArgumentError) as error:
        kind(device="tpu").validate()
    assert str(error.value) == "--device: must be one of cpu, cuda, got 'tpu'"
    with pytest.raises(InvalidArgumentError, match="--device: must be one of cpu, cuda"):
        RecordConfig(device="tpu").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidArgumentError) as error:
        kind(device="cuda").validate()
    assert str(error.value) == (
        "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kind(device="cuda").validate()
