"""The baselines' `device` (influence functions, TracIn, TRAK-style; analysis/baselines.py and
the registry's `takes_device`): `analyze --method influence|tracin|trak --device` and `compare
--device` for the checkpoint methods.

On the CPU: `device="cpu"` given explicitly gives the default's numbers bit for bit, reaches
every model the baselines build (each `model_at_checkpoint` call, TracIn's per checkpoint too)
and is saved with the config; `compare` gives its device to the checkpoint methods, also when it
reuses a stored config (the device is where a method runs, not what it computes). The test
marked `cuda` (skipped without a GPU; benchmarks/gpu_check.sh runs it) compares each method on
CUDA with the CPU in float64."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from hydra_store.analysis import baselines
from hydra_store.analysis.baselines import load_recorded_run
from hydra_store.analysis.comparison import run_comparison
from hydra_store.analysis.influence import InfluenceMethod
from hydra_store.analysis.methods import ContributionMethod, MethodRegistry, default_methods
from hydra_store.analysis.tracin import TracInMethod
from hydra_store.arguments import InfluenceConfig, TracInConfig, TrakConfig
from hydra_store.errors import InvalidArgumentError
from hydra_store_cli.main import app
from tests.analysis.conftest import spy_on_model_devices
from tests.cli.test_record import assert_one_error_line

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BASELINES = ("influence", "tracin", "trak")
NO_GPU = "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"


def devices_asked(monkeypatch) -> list:
    """The `device` of every model_at_checkpoint call the baselines make from now on."""
    return spy_on_model_devices(monkeypatch, baselines)


def configs(device: str | None) -> dict[str, object]:
    """Each baseline with per-test contributions of three test samples (TRAK-style projected
    by the tensor sketch: K = 64 of 910 parameters), on `device`."""
    per_test = (3, 17, 42)
    return {
        "influence": InfluenceConfig(per_test=per_test, device=device),
        "tracin": TracInConfig(per_test=per_test, device=device),
        "trak": TrakConfig(per_test=per_test, project_dim=64, device=device),
    }


def run_all(path, out, chosen: dict[str, object]) -> dict[str, dict[str, np.ndarray]]:
    """Run each method with its config into the results store `out`: every array it wrote."""
    registry = default_methods()
    found = {}
    for name, config in chosen.items():
        method = registry[name]
        method.run(path, config, out=out)
        group = zarr.open_group(out, mode="r")[f"{method.group}/test"]
        found[name] = {key: group[key][:] for key in group.array_keys()}
        assert group.attrs["config"]["device"] == config.device, name
    return found


def test_each_baseline_on_the_cpu_named_equals_the_default(float64_run, tmp_path, monkeypatch):
    seen = devices_asked(monkeypatch)
    default = run_all(float64_run.path, tmp_path / "default.zarr", configs(None))
    # influence and TRAK-style at the last checkpoint; TracIn there and at checkpoints 1, 2
    assert seen == [None] * 5
    seen.clear()
    named = run_all(float64_run.path, tmp_path / "cpu.zarr", configs("cpu"))
    assert seen == ["cpu"] * 5
    for name in BASELINES:
        assert named[name].keys() == default[name].keys()
        assert {"total_contribution", "contribution"} <= set(named[name])
        for key, values in named[name].items():
            np.testing.assert_array_equal(values, default[name][key], err_msg=f"{name}/{key}")
        assert np.abs(named[name]["contribution"]).max() > 0, name


def test_the_model_is_built_on_the_device_asked(float64_run):
    """load_recorded_run(device=) builds the model there, and RecordedRun.at keeps it there;
    the data stay in host memory."""
    run = load_recorded_run(float64_run.path, "test", None, dtype=torch.float64, device="cpu")
    for at in (run, run.at(1)):
        assert at.device == "cpu"
        tensors = [*at.model.parameters(), *at.model.buffers()]
        assert tensors and {t.device.type for t in tensors} == {"cpu"}
        assert {t.dtype for t in at.model.parameters()} == {torch.float64}
    assert run.at(1).checkpoint == 1 and run.train.inputs.device.type == "cpu"


def test_the_registry_marks_every_baseline_as_taking_a_device():
    registry = default_methods()
    assert all(method.takes_device for method in registry)
    for config_type in (InfluenceConfig, TracInConfig, TrakConfig):
        assert config_type().device is None
        with pytest.raises(InvalidArgumentError) as error:
            config_type(device="tpu").validate()
        assert str(error.value) == "--device: must be one of cpu, cuda, got 'tpu'"


def test_cuda_without_a_gpu_is_one_line_naming_device(float64_run, tmp_path, monkeypatch):
    """analyze --method influence|tracin|trak --device cuda where torch sees no GPU: exit 2, one
    line, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "results.zarr"
    runner = CliRunner()
    for name in BASELINES:
        command = ["analyze", str(float64_run.path), "--method", name, "--device", "cuda"]
        result = runner.invoke(app, [*command, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert_one_error_line(result, NO_GPU)
    assert not out.exists()


@dataclasses.dataclass(frozen=True)
class _HostOnlyConfig:
    test_set: str = "test"


class _HostOnlyMethod(ContributionMethod):
    """A plug-in's method whose arguments have no device."""

    name, group, config_type, description = "host-only", "host_only", _HostOnlyConfig, "test"

    def run(self, path, config, progress=None, inputs=None, out=None):
        raise AssertionError("a refused --device must not run the method")

    def totals(self, path, test_set):
        return {}


def test_a_method_without_a_device_still_refuses_cuda(float64_run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        "hydra_store.analysis.methods.default_methods",
        lambda: MethodRegistry((_HostOnlyMethod(),)),
    )
    assert not _HostOnlyMethod().takes_device
    command = ["analyze", str(float64_run.path), "--method", "host-only", "--device", "cuda"]
    result = CliRunner().invoke(app, command)
    assert_one_error_line(result, "--device cuda: method 'host-only' runs on the CPU only")


def test_compare_gives_its_device_to_the_checkpoint_methods(float64_run, tmp_path, monkeypatch):
    """A stored config is reused with compare's device (None: the CPU) in place of the one it
    ran with, and still counts as the config it last ran with; a method that has not run gets
    its defaults on compare's device; the models are built there."""
    out = tmp_path / "results.zarr"
    TracInMethod().run(float64_run.path, TracInConfig(batch_size=64, device="cpu"), out=out)
    config, stored = TracInMethod().checkpoint_config(out, "test")
    assert stored and config == TracInConfig(batch_size=64)
    config, stored = TracInMethod().checkpoint_config(out, "test", "cuda")
    assert stored and config == TracInConfig(batch_size=64, device="cuda")
    config, stored = InfluenceMethod().checkpoint_config(out, "test", "cpu")
    assert not stored and config == InfluenceConfig(solver="cg", device="cpu")

    seen = devices_asked(monkeypatch)
    summary = run_comparison(
        float64_run.path,
        "test",
        checkpoint_methods=("tracin", "trak"),
        png=tmp_path / "compare.png",
        out=out,
        device="cpu",
    )
    study = summary.study
    assert study.errors == [None, None, None] and study.stored == [True, True, False]
    assert [c["device"] for c in study.configs[1:]] == ["cpu", "cpu"]
    assert study.configs[1]["batch_size"] == 64
    assert seen and set(seen) == {"cpu"}
    group = zarr.open_group(out, mode="r")["reverse/test/comparison"]
    assert [c and c["device"] for c in group.attrs["checkpoint_method_config"]] == [
        None,
        "cpu",
        "cpu",
    ]


# -- on CUDA, against the CPU -------------------------------------------------------------------


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.cuda
@needs_cuda
def test_each_baseline_on_cuda_matches_the_cpu_in_float64(float64_run, tmp_path):
    """float64 (200 digits, 910 parameters, checkpoints 0..3), three test samples per test:
    C(i), C(i, j) and TracIn's per-checkpoint terms within 1e-8 of their largest value.
    Influence functions by all three solvers (cg to a 1e-12 residual and LiSSA with the same
    minibatches, drawn on the CPU, so that neither stops on a rounding), TRAK-style with the
    tensor sketch (its FFTs on the GPU) and unprojected. The systems are well conditioned (the
    damped Hessian's eigenvalues lie in [0.73, 4.57] at the last checkpoint), so the GPU's other
    float64 summation orders move the results by about 1e-15 (on the CPU, 1 thread against 2:
    at most 2.4e-15 of the largest value); 1e-8 leaves room and still catches any float32 step
    (~1e-7)."""
    cases = {
        "influence": InfluenceConfig(per_test=3),
        "influence cg": InfluenceConfig(per_test=3, solver="cg", cg_tolerance=1e-12),
        "influence lissa": InfluenceConfig(
            per_test=3, solver="lissa", damping=1.0, lissa_depth=50, lissa_repeats=1
        ),
        "tracin": TracInConfig(per_test=3),
        "trak": TrakConfig(per_test=3, project_dim=64),
        "trak unprojected": TrakConfig(per_test=3, project_dim=None),
    }
    registry = default_methods()
    for label, config in cases.items():
        found = {}
        for device in (None, "cuda"):
            out = tmp_path / f"{label}-{device}.zarr".replace(" ", "-")
            method = registry[label.split(" ")[0]]
            method.run(float64_run.path, dataclasses.replace(config, device=device), out=out)
            group = zarr.open_group(out, mode="r")[f"{method.group}/test"]
            found[device] = {key: group[key][:] for key in group.array_keys()}
        assert found["cuda"].keys() == found[None].keys()
        for key in ("total_contribution", "contribution", "checkpoint_contribution"):
            if key in found[None]:
                error = relative_error(found["cuda"][key], found[None][key])
                assert error < 1e-8, (label, key, error)
        np.testing.assert_array_equal(found["cuda"]["train"], found[None]["train"])
