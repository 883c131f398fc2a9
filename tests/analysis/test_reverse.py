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

from hydra_store.analysis.reverse import (
    adjoint_contributions,
    adjoint_contributions_at_checkpoints,
    run_exact_analysis,
)
from hydra_store.analysis.test_sets import resolve_test_set
from hydra_store.arguments import RecordConfig
from hydra_store.core.gradients import (
    batch_loss_function,
    mean_loss_gradient,
    per_sample_loss_function,
    per_sample_loss_gradients,
)
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


def naive_adjoint(
    trajectory: Trajectory, model: torch.nn.Module, train, checkpoint: int, u: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """(exact, approximate) C(i) of one direction taken at `checkpoint`, step by step with
    torch.autograd.functional (a Jacobian for the batch's per-sample gradients, an hvp of its
    mean loss for H a): independent of adjoint_step_products' weighted double backward."""
    n = trajectory.n_train
    a_w, a_v, b_w, b_v = u.clone(), torch.zeros_like(u), u.clone(), torch.zeros_like(u)
    s_exact = torch.zeros(n, dtype=torch.float64)
    s_approx = torch.zeros(n, dtype=torch.float64)
    for segment in reversed(range(checkpoint)):
        for step in reversed(list(trajectory.replay_segment(model, train, segment))):
            s = step.settings
            index = torch.as_tensor(step.batch_index, dtype=torch.int64)
            x, y = train.inputs[index].to(torch.float64), train.targets[index]
            losses = per_sample_loss_function(model, trajectory.layout, x, y)
            w = step.weights_before
            per_sample = torch.autograd.functional.jacobian(losses, w, vectorize=True)  # (B, P)
            a_vt, b_vt = a_v - s.lr * a_w, b_v - s.lr * b_w
            s_exact[index] += (n / index.numel()) * (per_sample @ a_vt)
            s_approx[index] += (n / index.numel()) * (per_sample @ b_vt)
            mean_loss = batch_loss_function(model, trajectory.layout, x, y)
            _, h_a = torch.autograd.functional.hvp(mean_loss, w, a_vt)
            a_w, a_v = a_w + h_a + s.weight_decay * a_vt, s.momentum * a_vt
            b_w, b_v = b_w + s.weight_decay * b_vt, s.momentum * b_vt
    return (-s_exact / n).numpy(), (-s_approx / n).numpy()


def checkpoint_directions(path: Path, checkpoint: int) -> torch.Tensor:
    """(2, P): the mean test-loss gradient and test sample 3's, at the checkpoint's weights."""
    model = model_at_checkpoint(path, checkpoint)
    layout = Trajectory(path).layout
    tests = resolve_test_set(path, "test")
    u = mean_loss_gradient(model, layout, tests.inputs, tests.targets)[0]
    g = per_sample_loss_gradients(model, layout, tests.inputs[3:4], tests.targets[3:4])
    return torch.cat([u[None], g.detach()])


def test_one_sweep_serves_every_checkpoint(float64_run):
    """One backward sweep from the last checkpoint, each earlier checkpoint's adjoint joining at
    its step, gives at every checkpoint what a sweep truncated there gives (the same arithmetic
    row by row), replaying the trajectory once; checkpoint 0 gets zero contributions. The
    truncated C(i) are those of a step-by-step adjoint through torch.autograd.functional."""
    path = float64_run.path
    trajectory = Trajectory(path)
    train = load_run_data(path).train
    directions = {k: checkpoint_directions(path, k) for k in range(4)}
    calls = []
    results = adjoint_contributions_at_checkpoints(
        trajectory,
        model_at_checkpoint(path, 0),
        train,
        directions,
        progress=lambda d, a, b: calls.append((d, a, b)),
    )
    assert list(results) == [0, 1, 2, 3]
    assert calls == [("reverse sweep", t, 21) for t in range(1, 22)]
    for k, result in results.items():
        separate = adjoint_contributions(
            trajectory, model_at_checkpoint(path, 0), train, directions[k], checkpoint=k
        )
        assert (
            (result.checkpoint, result.step) == (separate.checkpoint, separate.step) == (k, 7 * k)
        )
        assert result.exact.shape == result.approx.shape == (2, N_TRAIN)
        if k == 0:
            assert not result.exact.any() and not result.approx.any()
            assert not separate.exact.any() and not separate.approx.any()
            continue
        for row in range(2):
            assert relative_error(result.exact[row], separate.exact[row]) < 1e-12
            assert relative_error(result.approx[row], separate.approx[row]) < 1e-12
    for k in (1, 2):
        exact, approx = naive_adjoint(
            trajectory, model_at_checkpoint(path, 0), train, k, directions[k][0]
        )
        assert relative_error(results[k].exact[0], exact) < 1e-10
        assert relative_error(results[k].approx[0], approx) < 1e-10
        assert relative_error(results[k].approx[0], exact) > 1e-4  # the Hessian matters

    # a subset, the last named from the end, one direction (P,) at one of them
    subset = adjoint_contributions_at_checkpoints(
        trajectory, model_at_checkpoint(path, 0), train, {-1: directions[3], 1: directions[1][0]}
    )
    assert list(subset) == [1, 3]
    assert subset[1].exact.shape == (1, N_TRAIN)
    assert relative_error(subset[1].exact[0], results[1].exact[0]) < 1e-12
    assert relative_error(subset[3].approx, results[3].approx) < 1e-12


def test_one_sweep_refuses_bad_checkpoints(float64_run):
    path = float64_run.path
    trajectory = Trajectory(path)
    train = load_run_data(path).train
    model = model_at_checkpoint(path, 0)
    u = test_direction(path)
    for directions, message in (
        ({3: u, -1: u}, "checkpoint 3 is given twice"),
        ({}, "no checkpoint given"),
        ({4: u}, "checkpoint 4 does not exist"),
        ({2: u[None][:0]}, "directions must be"),  # no direction
        ({2: u[:-1]}, "directions must be"),  # not P long
    ):
        with pytest.raises(InvalidArgumentError, match=message):
            adjoint_contributions_at_checkpoints(trajectory, model, train, directions)
