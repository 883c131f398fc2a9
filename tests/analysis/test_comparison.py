"""`compare` against the exact contribution, and the CLI of compare and validate."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import typer
import xarray as xr
import zarr
from typer.testing import CliRunner

from hydra_store.analysis import comparison, reverse
from hydra_store.analysis.comparison import HYDRA_CURVE, run_comparison
from hydra_store.analysis.influence import run_influence
from hydra_store.analysis.methods import default_methods
from hydra_store.analysis.metrics import pearson, sign_error_rate, spearman
from hydra_store.analysis.reverse import adjoint_contributions, run_exact_analysis
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.analysis.tracin import run_tracin
from hydra_store.analysis.trak import run_trak
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.errors import InvalidArgumentError
from hydra_store.replay import recorded_run
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store_cli.reverse import register
from tests.cli.test_record import assert_one_error_line

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_scores():
    exact = np.array([1.0, -2.0, 3.0, -4.0])
    assert sign_error_rate(np.array([1.0, 2.0, 3.0, -4.0]), exact) == 0.25
    assert spearman(exact, 2 * exact + 1) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0, 2.0])) == pytest.approx(1.0)
    assert pearson(exact, -exact) == pytest.approx(-1.0)


def test_run_comparison(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    png = tmp_path / "curves.png"
    summary = run_comparison(path, "test", png=png, checkpoint_methods=("tracin",))
    assert summary.computed_exact
    assert png.is_file() and png.stat().st_size > 1000
    assert summary.checkpoint_step.tolist() == [7, 14, 21]
    approx = summary.scores[0]
    assert 0 <= approx.sign_error < 0.5 and approx.spearman > 0.5
    # the last checkpoint of the curve is the end-of-training score
    assert summary.checkpoint_spearman[-1] == pytest.approx(approx.spearman, rel=1e-12)
    # a method that has not run on the store is scored with its defaults
    assert summary.study.labels == [HYDRA_CURVE, "tracin"]
    assert summary.study.stored == [True, False]
    ds = xr.open_zarr(str(path), group="reverse/test/comparison")
    assert ds["sign_error"].dims == ("method",)
    assert ds["spearman_over_checkpoints"].dims == ("checkpoint_method", "checkpoint")
    assert ds["spearman_over_checkpoints"].shape == (2, 3)
    np.testing.assert_array_equal(ds["checkpoint"].values, [1, 2, 3])
    np.testing.assert_array_equal(
        ds["spearman_over_checkpoints"].values[0], ds["checkpoint_spearman"].values
    )
    assert any("paper, influence functions" in line for line in summary.lines())


def test_every_baseline_over_checkpoints(float64_run, tmp_path):
    """Influence functions, TracIn and TRAK-style over checkpoints, with the settings each last
    ran with: at the last checkpoint each curve is the end-of-training score; at checkpoint 1
    the influence curve scores what `analyze --method influence --checkpoint 1` stores against
    what `analyze --method hydra-exact --checkpoint 1` stores."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    run_influence(path, "test", solver="cg", damping=1.0, per_test=3)
    run_tracin(path, "test")
    run_trak(path, "test", project_dim=64)
    summary = run_comparison(path, "test")
    study = summary.study
    assert study.labels == [
        HYDRA_CURVE,
        "influence (cg, damping 1)",
        "tracin",
        "trak-style (K=64, damping 0.01)",
    ]
    assert study.stored == [True] * 4 and study.errors == [None] * 4
    assert study.configs[1]["per_test"] is None  # the study needs C(i) only
    table = {s.method.split(" ")[0]: s for s in summary.scores}
    for row, key in ((1, "influence"), (2, "tracin"), (3, "trak-style")):
        assert study.sign_error[row, -1] == table[key].sign_error
        assert study.spearman[row, -1] == pytest.approx(table[key].spearman, rel=1e-12)

    early = tmp_path / "checkpoint-1.zarr"
    exact = run_exact_analysis(path, "test", checkpoint=1, out=early).total_exact
    influence = run_influence(path, "test", solver="cg", damping=1.0, checkpoint=1, out=early)
    assert study.sign_error[1, 0] == sign_error_rate(influence.total, exact)
    assert study.spearman[1, 0] == pytest.approx(spearman(influence.total, exact), rel=1e-12)

    # A baseline computed before the last checkpoint is left out of compare, and said so.
    run_influence(path, "test", solver="cg", damping=1.0, checkpoint=2)
    again = run_comparison(path, "test", over_checkpoints=False)
    assert not any(s.method.startswith("influence") for s in again.scores)
    assert any(
        line.startswith("skipped influence/test: computed at checkpoint 2")
        for line in again.lines()
    )


def test_checkpoint_curves_equal_one_truncated_sweep_per_checkpoint(float64_run, tmp_path):
    """The study's one backward sweep (replaying the 21 steps once, one progress bar) stores the
    curves that one sweep truncated at each checkpoint gives, the way they were computed before:
    at checkpoints 1 and 3 (`every=2`), HyDRA's approximation and TracIn against the exact C(i)
    of `adjoint_contributions(..., checkpoint=k)` with u taken at checkpoint k."""
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    calls = []
    run_comparison(
        path,
        "test",
        every=2,
        checkpoint_methods=("tracin",),
        png=tmp_path / "curves.png",
        progress=lambda d, a, b: calls.append((d, a, b)),
    )
    stage = "reverse sweep, all checkpoints"
    assert [c for c in calls if c[0] == stage] == [(stage, t, 21) for t in range(1, 22)]
    ds = xr.open_zarr(str(path), group="reverse/test/comparison")
    np.testing.assert_array_equal(ds["checkpoint"].values, [1, 3])
    np.testing.assert_array_equal(ds["checkpoint_step"].values, [7, 21])
    sign_errors = ds["sign_error_over_checkpoints"].values
    correlations = ds["spearman_over_checkpoints"].values
    assert sign_errors.shape == correlations.shape == (2, 2)

    trajectory = Trajectory(path)
    train = load_run_data(path).train
    tests = resolve_test_set(path, "test")
    tracin = default_methods()["tracin"]
    predicted = tracin.totals_at(path, [1, 3], tracin.default_checkpoint_config("test"))
    for column, k in enumerate([1, 3]):
        model = model_at_checkpoint(path, k)
        u = mean_loss_gradient(model, trajectory.layout, tests.inputs, tests.targets)[0]
        separate = adjoint_contributions(
            trajectory, model_at_checkpoint(path, 0), train, u[None], checkpoint=k
        )
        exact = separate.exact[0]
        for row, values in enumerate((separate.approx[0], predicted[column])):
            assert sign_errors[row, column] == sign_error_rate(values, exact)
            assert correlations[row, column] == pytest.approx(spearman(values, exact), rel=1e-12)
    assert np.isfinite(correlations).all() and not np.allclose(correlations[0], correlations[1])


def test_cli_compare_and_validate(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    runner = CliRunner()
    app = make_app()
    result = runner.invoke(app, ["compare", str(path), "--no-checkpoints"])
    assert result.exit_code == 0, result.output
    assert "sign error" in result.output
    result = runner.invoke(app, ["compare", str(path), "--checkpoint-methods", "tracin"])
    assert result.exit_code == 0, result.output
    assert "  tracin (" in result.output and "defaults): 7: " in result.output
    result = runner.invoke(app, ["validate", str(path), "--samples", "4"])
    assert result.exit_code == 0, result.output
    assert "hydra-exact" in result.output
    result = runner.invoke(app, ["validate", str(path), "--samples", "4", "--selection", "best"])
    assert result.exit_code == 2
    assert "--selection" in result.output


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "hydra",
            "--checkpoint-methods: 'hydra' gives no C(i) at earlier checkpoints; choose among "
            "influence, tracin, trak, or 'none'",
        ),
        (
            "tracin,datamodels",
            "--checkpoint-methods: unknown method 'datamodels'; choose among influence, tracin, "
            "trak, or 'none'",
        ),
        (
            ",",
            "--checkpoint-methods: name methods separated by commas (e.g. influence,tracin), "
            "or 'none'",
        ),
    ],
)
def test_cli_bad_checkpoint_methods_are_one_error_line(float64_run, value, message):
    result = CliRunner().invoke(
        make_app(), ["compare", str(float64_run.path), "--checkpoint-methods", value]
    )
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"


def test_cli_missing_store(tmp_path):
    result = CliRunner().invoke(make_app(), ["compare", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
    assert "no store" in result.output


# -- --device: where the reverse sweeps run -------------------------------------------------------

COMPARED = ("sign_error", "spearman", "pearson", "sign_error_over_checkpoints")


def compared_on(path, out, device) -> tuple[dict[str, np.ndarray], dict]:
    """compare (TracIn over checkpoints 1, 2, 3) into the fresh results store `out`, so that
    reverse/test is computed first, on `device`: its arrays, the exact and approximate C(i) and
    the comparison's config attribute."""
    summary = run_comparison(
        path,
        "test",
        checkpoint_methods=("tracin",),
        png=out.with_suffix(".png"),
        out=out,
        device=device,
    )
    assert summary.computed_exact and summary.study.errors == [None, None]
    root = zarr.open_group(out, mode="r")
    group = root["reverse/test/comparison"]
    arrays = {n: group[n][:] for n in (*COMPARED, "spearman_over_checkpoints", "checkpoint")}
    for name in ("total_contribution_exact", "total_contribution_approx"):
        arrays[name] = root["reverse/test"][name][:]
    return arrays, dict(group.attrs["config"])


def test_compare_on_the_cpu_named_equals_the_default(float64_run, tmp_path, monkeypatch):
    """`device="cpu"` given explicitly: every number the default gives, bit for bit, and the
    device reaches every model the reverse sweeps build (the exact C(i) at the last checkpoint,
    u at checkpoints 1..3 and the sweep's model at checkpoint 0); saved with the config."""
    seen = []
    original = recorded_run.model_at_checkpoint

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return original(*args, **kwargs)

    for module in (reverse, comparison):
        monkeypatch.setattr(module, "model_at_checkpoint", spy)
    default, default_config = compared_on(float64_run.path, tmp_path / "default.zarr", None)
    assert seen == [None] * 5
    seen.clear()
    named, named_config = compared_on(float64_run.path, tmp_path / "cpu.zarr", "cpu")
    assert seen == ["cpu"] * 5
    assert named.keys() == default.keys()
    for name, values in named.items():
        np.testing.assert_array_equal(values, default[name], err_msg=name)
    np.testing.assert_array_equal(named["checkpoint"], [1, 2, 3])
    assert np.isfinite(named["spearman_over_checkpoints"]).all()
    assert default_config["device"] is None and named_config["device"] == "cpu"
    assert {k: v for k, v in named_config.items() if k not in ("device", "png")} == {
        k: v for k, v in default_config.items() if k not in ("device", "png")
    }


def test_compare_refuses_a_bad_device_in_one_line(float64_run, tmp_path, monkeypatch):
    """A name that is no device, and cuda where torch sees no GPU: refused before anything is
    read or written, in the words of the other commands' --device."""
    out = tmp_path / "results.zarr"
    with pytest.raises(InvalidArgumentError) as error:
        run_comparison(float64_run.path, "test", device="tpu", out=out)
    assert str(error.value) == "--device: must be one of cpu, cuda, got 'tpu'"
    runner = CliRunner()
    result = runner.invoke(
        make_app(), ["compare", str(float64_run.path), "--device", "tpu", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert_one_error_line(result, "--device: must be one of cpu, cuda, got 'tpu'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
    with pytest.raises(InvalidArgumentError) as error:
        run_comparison(float64_run.path, "test", device="cuda", out=out)
    assert str(error.value) == message
    result = runner.invoke(
        make_app(), ["compare", str(float64_run.path), "--device", "cuda", "--out", str(out)]
    )
    assert result.exit_code == 2
    assert_one_error_line(result, message)
    assert not out.exists()


@pytest.mark.cuda
@needs_cuda
def test_compare_on_cuda_matches_the_cpu(float64_run, tmp_path):
    """float64, CPU-recorded, no dropout (200 digits, 21 steps): the exact and approximate C(i)
    of the sweep on the GPU within 1e-9 of their largest value (as reverse mode's in
    tests/analysis/test_devices.py); so the scores against them agree: sign error rates within
    one sample in 200 (a C(i) within 1e-9 of zero may change sign), Spearman and Pearson within
    1e-5 (one swap of two neighbouring ranks moves Spearman by 1.5e-6 at N = 200)."""
    cpu, _ = compared_on(float64_run.path, tmp_path / "cpu.zarr", None)
    gpu, config = compared_on(float64_run.path, tmp_path / "cuda.zarr", "cuda")
    assert config["device"] == "cuda"
    for name in ("total_contribution_exact", "total_contribution_approx"):
        error = float(np.abs(gpu[name] - cpu[name]).max() / np.abs(cpu[name]).max())
        assert error < 1e-9, (name, error)
    np.testing.assert_array_equal(gpu["checkpoint"], cpu["checkpoint"])
    for name in ("sign_error", "sign_error_over_checkpoints"):
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=0, atol=1 / 200 + 1e-12)
    for name in ("spearman", "pearson", "spearman_over_checkpoints"):
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=0, atol=1e-5, err_msg=name)
