"""Reverse mode through the stored trajectory against the forward exact and approximate modes,
in float64, with momentum, weight decay, a changing learning rate and a partial last batch."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from hydra_store.analysis.reverse import adjoint_contributions, run_exact_analysis
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.arguments import RecordConfig
from hydra_store.core.gradients import mean_loss_gradient, per_sample_loss_gradients
from hydra_store.data.datasets import load_dataset
from hydra_store.data.models import build_model
from hydra_store.data.training_data import dataset_attrs
from hydra_store.errors import InvalidArgumentError, ReplayMismatchError
from hydra_store.recording.recorder import HydraRecorder
from hydra_store.recording.training import record_run
from hydra_store.replay.recorded_run import load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory

N_TRAIN, N_TEST, BATCH, EPOCHS = 200, 100, 32, 3  # 200 = 6 batches of 32 + a partial one of 8
MODEL = "mlp:hidden=12"


@dataclass(frozen=True)
class Float64Run:
    path: Path
    tracked: np.ndarray
    h_approx: torch.Tensor  # (tracked, P) float64, straight from the recorder
    h_exact: torch.Tensor


def write_subset_npz(out: Path) -> Path:
    """The first 200 training and 100 test samples of digits, as a user data set (.npz)."""
    bundle = load_dataset("digits", seed=0)
    npz = out / "digits200.npz"
    np.savez(
        npz,
        x_train=bundle.train.inputs[:N_TRAIN].numpy(),
        y_train=bundle.train.targets[:N_TRAIN].numpy(),
        x_test=bundle.test.inputs[:N_TEST].numpy(),
        y_test=bundle.test.targets[:N_TEST].numpy(),
        class_names=np.array(bundle.class_names),
    )
    return npz


def record_float64(out: Path, mode: str = "both", tracked: np.ndarray | None = None):
    """A float64 run recorded with HydraRecorder: momentum, weight decay, an lr that changes
    every step and at every epoch, and a partial last batch."""
    npz = write_subset_npz(out)
    bundle = load_dataset(str(npz))
    labels = bundle.train.targets.numpy().astype(np.int64)
    model = build_model(
        MODEL, input_shape=bundle.input_shape, n_classes=10, seed=0, dtype=torch.float64
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-3)
    config = RecordConfig(
        dataset=str(npz), model=MODEL, batch_size=BATCH, epochs=EPOCHS, out=str(out / "r.zarr")
    )
    recorder = HydraRecorder(
        model,
        optimizer,
        out / "run64.zarr",
        n_train=N_TRAIN,
        tracked=tracked,
        train_labels=labels,
        mode=mode,
        checkpoint_every=1,
        config=config.to_attrs(),
        attrs={"dataset": dataset_attrs(bundle, labels)},
    )
    generator = torch.Generator().manual_seed(0)
    inputs, targets = bundle.train.inputs, bundle.train.targets
    with recorder:
        for _epoch in range(EPOCHS):
            order = torch.randperm(N_TRAIN, generator=generator)
            for start in range(0, N_TRAIN, BATCH):
                index = order[start : start + BATCH]
                recorder.step(inputs[index], targets[index], index)
                for group in optimizer.param_groups:
                    group["lr"] *= 0.97
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
            recorder.end_epoch()
        h_approx = recorder.hypergradients().clone() if mode in ("approximate", "both") else None
        h_exact = recorder.hypergradients(exact=True).clone() if mode != "approximate" else None
    return out / "run64.zarr", h_approx, h_exact


@pytest.fixture(scope="session")
def float64_run(tmp_path_factory) -> Float64Run:
    out = tmp_path_factory.mktemp("float64")
    tracked = np.array([0, 1, 5, 17, 33, 64, 99, 100, 150, 198, 199])
    path, h_approx, h_exact = record_float64(out, "both", tracked)
    return Float64Run(path, tracked, h_approx, h_exact)


def test_direction(path: Path) -> torch.Tensor:
    tests = resolve_test_set(path, "test")
    model = model_at_checkpoint(path, -1)
    trajectory = Trajectory(path)
    return mean_loss_gradient(model, trajectory.layout, tests.inputs, tests.targets)[0]


test_direction.__test__ = False  # a helper, not a test


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_reverse_equals_forward_modes_float64(float64_run):
    path = float64_run.path
    trajectory = Trajectory(path)
    u = test_direction(path)
    assert u.dtype == torch.float64
    result = adjoint_contributions(
        trajectory, model_at_checkpoint(path, 0), load_run_data(path).train, u[None]
    )
    assert result.exact.shape == (1, N_TRAIN)
    forward_exact = (-(float64_run.h_exact @ u) / N_TRAIN).numpy()
    forward_approx = (-(float64_run.h_approx @ u) / N_TRAIN).numpy()
    tracked = float64_run.tracked
    assert relative_error(result.exact[0, tracked], forward_exact) < 1e-10
    assert relative_error(result.approx[0, tracked], forward_approx) < 1e-10
    # the Hessian matters here: exact and approximate differ well beyond rounding
    assert relative_error(result.approx[0, tracked], forward_exact) > 1e-4


def test_per_test_directions_batched(float64_run):
    """K directions at once give each direction's single-direction result, and C(i) is the mean
    of the C(i, j) over the whole test set."""
    path = float64_run.path
    trajectory = Trajectory(path)
    tests = resolve_test_set(path, "test")
    final = model_at_checkpoint(path, -1)
    g = per_sample_loss_gradients(final, trajectory.layout, tests.inputs, tests.targets).detach()
    train = load_run_data(path).train
    both = adjoint_contributions(trajectory, model_at_checkpoint(path, 0), train, g[[3, 7]])
    single = adjoint_contributions(trajectory, model_at_checkpoint(path, 0), train, g[7:8])
    assert relative_error(both.exact[1], single.exact[0]) < 1e-12
    u = g.mean(0)
    assert torch.allclose(u, test_direction(path), rtol=1e-12, atol=1e-15)


def test_run_exact_analysis_writes_group(float64_run, tmp_path):
    path = tmp_path / "copy.zarr"
    shutil.copytree(float64_run.path, path)
    calls = []
    summary = run_exact_analysis(
        path, "test", per_test=N_TEST, progress=lambda d, a, b: calls.append((d, a, b))
    )
    assert summary.n_train == N_TRAIN and summary.n_per_test == N_TEST
    assert calls[-1] == ("per-test directions", 7, 7)
    assert ("reverse sweep", 21, 21) in calls
    ds = xr.open_zarr(str(path), group="reverse/test")
    assert ds["total_contribution_exact"].dims == ("train",)
    assert ds["contribution_exact"].dims == ("train", "test")
    total = ds["total_contribution_exact"].values
    per_test = ds["contribution_exact"].values
    assert relative_error(per_test.mean(axis=1), total) < 1e-10
    u = test_direction(path)
    forward = (-(float64_run.h_exact @ u) / N_TRAIN).numpy()
    assert relative_error(total[float64_run.tracked], forward) < 1e-10
    assert any("sign error" in line for line in summary.lines())
    # rerunning swaps the group atomically: no staging directories remain
    run_exact_analysis(path, "test")
    leftovers = [p.name for p in (path / "reverse").iterdir() if "." in p.name and p.is_dir()]
    assert leftovers == []
    assert "contribution_exact" not in xr.open_zarr(str(path), group="reverse/test")


def test_mismatching_checkpoint_is_refused(float64_run, tmp_path):
    path = tmp_path / "bad.zarr"
    shutil.copytree(float64_run.path, path)
    weights = zarr.open_group(path, mode="r+")["weights"]
    row = np.asarray(weights[2])
    row[5] += 0.5
    weights[2] = row
    with pytest.raises(ReplayMismatchError, match="does not reproduce checkpoint"):
        run_exact_analysis(path, "test")


def test_bad_arguments(float64_run):
    with pytest.raises(InvalidArgumentError, match="per-test"):
        run_exact_analysis(float64_run.path, "test", per_test=N_TEST + 1)
    with pytest.raises(InvalidArgumentError, match="checkpoint"):
        run_exact_analysis(float64_run.path, "test", checkpoint=17)


def test_trajectory_only_store(tmp_path):
    """A store without hypergradients (mode 'trajectory', float32 built-in run) is analysed."""
    out = tmp_path / "traj.zarr"
    record_run(
        RecordConfig(
            dataset="digits",
            model="mlp:hidden=8",
            epochs=2,
            lr=0.1,
            mode="trajectory",
            out=str(out),
        )
    )
    assert "hypergradient" not in zarr.open_group(out, mode="r")
    summary = run_exact_analysis(out, "test")
    assert summary.n_train == 1437
    ds = xr.open_zarr(str(out), group="reverse/test")
    exact = ds["total_contribution_exact"].values
    approx = ds["total_contribution_approx"].values
    assert np.isfinite(exact).all() and np.abs(exact).max() > 0
    assert np.isfinite(approx).all() and not np.allclose(exact, approx)


def test_per_test_directions_on_a_local_cluster_equal_threads(float64_run, tmp_path):
    """Each dask task (a chunk of test directions over the whole trajectory) runs in a worker
    process of a dask.distributed LocalCluster; results equal the threaded run's."""
    results = {}
    for scheduler in ("threads", "local-cluster"):
        path = tmp_path / f"{scheduler}.zarr"
        shutil.copytree(float64_run.path, path)
        run_exact_analysis(path, "test", per_test=3, scheduler=scheduler)
        results[scheduler] = xr.open_zarr(str(path), group="reverse/test")
    threads, cluster = results["threads"], results["local-cluster"]
    assert cluster["contribution_exact"].shape == (N_TRAIN, 3)
    np.testing.assert_allclose(
        cluster["contribution_exact"].values, threads["contribution_exact"].values, rtol=1e-12
    )
    np.testing.assert_allclose(
        cluster["contribution_approx"].values, threads["contribution_approx"].values, rtol=1e-12
    )
    assert np.abs(cluster["contribution_exact"].values).max() > 0
