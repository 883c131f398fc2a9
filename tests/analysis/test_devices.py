"""The analysers' `device`: `analyze` (test gradients), reverse mode, `validate` and
`validate --lds` (retrainings).

On the CPU: `device="cpu"` given explicitly gives the default's numbers bit for bit and reaches
every model the analysers build (each `model_at_checkpoint` call, in every task). Tests marked
`cuda` (skipped without a GPU; benchmarks/gpu_check.sh runs them) compare a run on CUDA with
the CPU one, with the tolerances stated at each."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from typer.testing import CliRunner

from hydra_store import RunInputs
from hydra_store.analysis import reverse, validation
from hydra_store.analysis.lds import run_lds
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.stored import analyze
from hydra_store.analysis.validation import retrain_weighted, run_validation
from hydra_store.arguments import AnalyzeConfig
from hydra_store.core.losses import cross_entropy
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError
from hydra_store.replay import recorded_run
from hydra_store.replay.recorded_run import as_split, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store_cli.main import app
from tests.analysis.conftest import spy_on_model_devices
from tests.cli.test_record import assert_one_error_line

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ANALYSED = ("test_gradient", "test_loss", "contribution", "total_contribution", "interclass")
REVERSE = (
    "total_contribution_exact",
    "total_contribution_approx",
    "contribution_exact",
    "contribution_approx",
)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|."""
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def devices_asked(monkeypatch) -> list:
    """The `device` of every model_at_checkpoint call the analysers make from now on."""
    return spy_on_model_devices(monkeypatch, recorded_run, reverse, validation)


def every_analyser(path, out, device) -> dict[str, np.ndarray]:
    """Reverse mode with 3 per-test directions, leave-one-out of 3 samples and LDS over 3
    subsets on `device`, into the results store `out`: every array they wrote."""
    run_exact_analysis(path, "test", per_test=3, device=device, out=out)
    run_validation(path, "test", samples=3, device=device, out=out)
    run_lds(path, "test", subsets=3, device=device, out=out)
    root = zarr.open_group(out, mode="r")
    arrays = {f"reverse/{n}": root["reverse/test"][n][:] for n in REVERSE}
    for name in ("loss_change", "validation_sample"):
        arrays[f"validation/{name}"] = root["reverse/test/validation"][name][:]
    for name in ("test_loss", "test_loss_full", "subset_mask"):
        arrays[f"lds/{name}"] = root["reverse/test/lds"][name][:]
    return arrays


# -- on the CPU ---------------------------------------------------------------------------------


def test_every_analyser_on_the_cpu_named_equals_the_default(float64_run, tmp_path, monkeypatch):
    seen = devices_asked(monkeypatch)
    default = every_analyser(float64_run.path, tmp_path / "default.zarr", None)
    assert seen and set(seen) == {None}
    seen.clear()
    named = every_analyser(float64_run.path, tmp_path / "cpu.zarr", "cpu")
    # the final model, one per-test task and 1 + 3 retrainings, and 1 + 3 for LDS
    assert seen == ["cpu"] * 10
    assert named.keys() == default.keys()
    for name, values in named.items():
        np.testing.assert_array_equal(values, default[name], err_msg=name)
    assert np.abs(named["validation/loss_change"]).max() > 0
    root = zarr.open_group(tmp_path / "cpu.zarr", mode="r")
    for group in ("reverse/test", "reverse/test/validation", "reverse/test/lds"):
        assert root[group].attrs["config"]["device"] == "cpu", group


def test_analyze_on_the_cpu_named_equals_the_default(
    analysed_store, digits_store, tmp_path, monkeypatch
):
    seen = devices_asked(monkeypatch)
    out = tmp_path / "cpu.zarr"
    analyze(digits_store, AnalyzeConfig(figures=False, top_k=5, device="cpu"), out=out)
    assert seen == ["cpu"]
    default = xr.open_zarr(str(analysed_store), group="analysis/test")
    named = xr.open_zarr(str(out), group="analysis/test")
    for name in ANALYSED:
        np.testing.assert_array_equal(named[name].values, default[name].values, err_msg=name)
    assert named.attrs["config"]["device"] == "cpu"


def test_cuda_without_a_gpu_is_refused_before_anything_is_written(
    float64_run, digits_store, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "results.zarr"
    message = "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
    calls = [
        lambda: analyze(digits_store, AnalyzeConfig(device="cuda"), out=out),
        lambda: run_exact_analysis(float64_run.path, "test", device="cuda", out=out),
        lambda: run_validation(float64_run.path, "test", device="cuda", out=out),
        lambda: run_lds(float64_run.path, "test", device="cuda", out=out),
    ]
    for call in calls:
        with pytest.raises(InvalidArgumentError) as error:
            call()
        assert str(error.value) == message
    assert not out.exists()
    runner = CliRunner()
    for command in (
        ["analyze", str(digits_store), "--device", "cuda", "--out", str(out)],
        ["analyze", str(float64_run.path), "--method", "hydra-exact", "--device", "cuda"],
        ["validate", str(float64_run.path), "--device", "cuda", "--out", str(out)],
        ["validate", str(float64_run.path), "--lds", "--device", "cuda", "--out", str(out)],
    ):
        result = runner.invoke(app, command)
        assert_one_error_line(result, message)
    assert not out.exists()


def test_a_baseline_refuses_a_name_that_is_no_device_in_one_line(digits_store):
    """The baselines take a device too (tests/analysis/test_baseline_devices.py, with a
    plug-in's method that takes none and refuses CUDA in one line)."""
    runner = CliRunner()
    bad = runner.invoke(app, ["analyze", str(digits_store), "--method", "trak", "--device", "tpu"])
    assert_one_error_line(bad, "--device: must be one of cpu, cuda, got 'tpu'")


# -- on CUDA, against the CPU -------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_analyze_on_cuda_matches_the_cpu(analysed_store, digits_store, tmp_path):
    """float32 (digits, MLP, 1,210 parameters): the per-sample test gradients and losses within
    1e-5 of their largest value (a few float32 roundings of sums over <= 64 terms differ
    between the CPU and the GPU kernels); C(i, j), C(i) and the class matrix, products of those
    gradients with the stored hypergradients, within 1e-4 of their largest value."""
    out = tmp_path / "cuda.zarr"
    analyze(digits_store, AnalyzeConfig(figures=False, top_k=5, device="cuda"), out=out)
    cpu = xr.open_zarr(str(analysed_store), group="analysis/test")
    gpu = xr.open_zarr(str(out), group="analysis/test")
    for name, tolerance in zip(ANALYSED, (1e-5, 1e-5, 1e-4, 1e-4, 1e-4), strict=True):
        error = relative_error(gpu[name].values, cpu[name].values)
        assert error <= tolerance, (name, error)


@pytest.mark.cuda
@needs_cuda
def test_every_analyser_on_cuda_matches_the_cpu_in_float64(float64_run, tmp_path):
    """float64, CPU-recorded (200 digits, 21 steps): reverse mode's C(i) and C(i, j) within
    1e-9 of their largest value, the leave-one-out changes of the test loss (differences of
    two losses near 1, so float64 rounding of ~1e-15 each) within 1e-7 relative or 1e-12
    absolute, the LDS subsets' test losses within 1e-9 relative."""
    cpu = every_analyser(float64_run.path, tmp_path / "cpu.zarr", None)
    gpu = every_analyser(float64_run.path, tmp_path / "cuda.zarr", "cuda")
    for name in REVERSE:
        assert relative_error(gpu[f"reverse/{name}"], cpu[f"reverse/{name}"]) < 1e-9, name
    np.testing.assert_array_equal(
        gpu["validation/validation_sample"], cpu["validation/validation_sample"]
    )
    np.testing.assert_allclose(
        gpu["validation/loss_change"], cpu["validation/loss_change"], rtol=1e-7, atol=1e-12
    )
    np.testing.assert_array_equal(gpu["lds/subset_mask"], cpu["lds/subset_mask"])
    for name in ("lds/test_loss", "lds/test_loss_full"):
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=1e-9, atol=0, err_msg=name)


@pytest.mark.cuda
@needs_cuda
def test_reverse_mode_on_cuda_matches_the_cpu_in_float32(digits_store, tmp_path):
    """float32, CPU-recorded digits (69 steps): the replay on the GPU passes the check against
    every stored checkpoint (1e-5 of the largest weight), and the exact and approximate C(i)
    agree within 1e-3 of their largest value (float32 roundings carried through 69 adjoint
    steps)."""
    runs = {}
    for device in (None, "cuda"):
        out = tmp_path / f"{device}.zarr"
        run_exact_analysis(digits_store, "test", device=device, out=out)
        runs[device] = zarr.open_group(out, mode="r")["reverse/test"]
    for name in ("total_contribution_exact", "total_contribution_approx"):
        error = relative_error(runs["cuda"][name][:], runs[None][name][:])
        assert error < 1e-3, (name, error)


@pytest.mark.cuda
@needs_cuda
def test_a_dropout_run_recorded_on_cuda_is_analysed_on_cuda(tmp_path):
    """BatchNorm and dropout, float64, recorded on the GPU (its masks drawn there): reverse
    mode on CUDA equals the forward recording (1e-10 of the largest value, as on the CPU in
    tests/recording/test_batch_norm.py), retraining on CUDA reproduces the stored weights; on
    the CPU, and for a CPU-recorded copy on CUDA, it is refused: the masks would differ."""
    from tests.recording.test_batch_norm import N_TRAIN, coupled_net, data, record_coupled_run

    (x, y), test = data()
    runs = {}
    for device in ("cpu", "cuda"):
        path = tmp_path / f"{device}.zarr"
        model, _, _, h_exact = record_coupled_run(path, device)
        runs[device] = (path, model, h_exact)
    inputs = RunInputs(coupled_net, (x, y), test)
    path, trained, h_exact = runs["cuda"]
    assert zarr.open_group(path, mode="r")["step_seed"].attrs["device"] == "cuda"
    summary = run_exact_analysis(path, inputs=inputs, device="cuda", out=tmp_path / "r.zarr")
    trained.eval()
    loss = cross_entropy(trained(test[0].cuda()), test[1].cuda()).mean()
    u = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(trained.parameters()))])
    expected = (-(h_exact @ u.cpu()) / N_TRAIN).detach().numpy()
    np.testing.assert_allclose(
        summary.total_exact, expected, rtol=0, atol=1e-10 * np.abs(expected).max()
    )
    trajectory = Trajectory(path)
    model = model_at_checkpoint(path, 0, inputs=inputs, device="cuda")
    final = retrain_weighted(trajectory, model, as_split((x, y), "training"), None)
    stored = trajectory.weights(len(trajectory.checkpoint_step) - 1)
    assert np.abs(final.cpu().numpy() - stored).max() <= 1e-10 * np.abs(stored).max()
    with pytest.raises(ReplayMismatchError, match="were drawn on cuda, and cpu draws other"):
        run_exact_analysis(path, inputs=inputs, out=tmp_path / "cpu-results.zarr")
    with pytest.raises(ReplayMismatchError, match="were drawn on cpu, and cuda draws other"):
        run_exact_analysis(runs["cpu"][0], inputs=inputs, device="cuda", out=tmp_path / "x.zarr")
