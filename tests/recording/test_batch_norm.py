"""BatchNorm (coupling the samples of a batch) and dropout (random masks) in a recorded run:
hypergradients against autograd through the unrolled training, replay of the weights and
running statistics, reverse mode against the forward recording, the running-statistics path of
the test loss measured by central differences of the full replay, and leave-one-out
retraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from torch import nn

import hydra_store
from hydra_store import RunInputs
from hydra_store.analysis.reverse import run_exact_analysis
from hydra_store.analysis.validation import retrain_weighted, run_validation
from hydra_store.core.gradients import evaluate
from hydra_store.core.losses import cross_entropy
from hydra_store.core.model_state import step_randomness
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
from hydra_store.errors import InvalidArgumentError, ModelError, ReplayMismatchError
from hydra_store.replay.trajectory import Trajectory
from tests.conftest import unrolled_final_weights

N_TRAIN, N_TEST = 16, 10


def coupled_net() -> nn.Module:
    """Linear, BatchNorm, ReLU, dropout, Linear; float64, initial weights fixed."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).double()


def data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + N_TEST, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=generator)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def record_coupled_run(path, device: str = "cpu"):
    """Two epochs of batches 6, 6, 4 with momentum and weight decay, every sample tracked by
    both recurrences, on `device`: (model, initial weights, h, h_exact), all but the model on
    the CPU."""
    (x, y), _ = data()
    model = coupled_net().to(device)
    initial = get_flat_parameters(model, ParameterLayout.from_model(model)).clone().cpu()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    generator = torch.Generator().manual_seed(2)
    recorder = hydra_store.HydraRecorder(
        model, optimizer, path, n_train=N_TRAIN, mode="both", seed=3
    )
    with recorder:
        for _ in range(2):
            for index in torch.randperm(N_TRAIN, generator=generator).split(6):
                recorder.step(x[index], y[index], index)
            recorder.end_epoch()
        h = recorder.hypergradients().clone().cpu()
        h_exact = recorder.hypergradients(True).clone().cpu()
    return model, initial, h, h_exact


@pytest.fixture(scope="module")
def coupled_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bn") / "bn.zarr"
    train, test = data()
    model, initial, h, h_exact = record_coupled_run(path)
    return path, train, test, initial, h, h_exact, model


def test_hypergradients_equal_autograd_through_the_unrolled_training(coupled_run):
    path, (x, y), _, initial, h, h_exact, _ = coupled_run
    args = (path, coupled_net(), x, y, initial, cross_entropy)
    approx = unrolled_final_weights(*args, detach_gradients=True)
    exact = unrolled_final_weights(*args, detach_gradients=False)
    assert exact.abs().max() > 1e-2
    assert (h - approx).abs().max() <= 1e-10 * approx.abs().max()
    assert (h_exact - exact).abs().max() <= 1e-10 * exact.abs().max()


def test_the_store_holds_running_statistics_and_seeds_and_replay_reproduces_them(coupled_run):
    path, train, test, *_ = coupled_run
    group = zarr.open_group(path, mode="r")
    assert group.attrs["buffer_layout"]["names"] == [
        "1.running_mean",
        "1.running_var",
        "1.num_batches_tracked",
    ]
    buffers = np.asarray(group["buffers"][:])
    assert buffers.shape == (3, 13) and buffers[-1, -1] == 6  # six steps tracked
    assert not np.array_equal(buffers[0, :6], buffers[-1, :6])
    assert np.unique(group["step_seed"][:]).size == 6
    inputs = RunInputs(model=coupled_net, train=train, test=test)
    model = hydra_store.model_at_checkpoint(path, -1, inputs=inputs)
    np.testing.assert_array_equal(model[1].running_var.detach().numpy(), buffers[-1, 6:12])
    trajectory = Trajectory(path)
    replayed = coupled_net()
    for checkpoint in range(2):
        for _ in trajectory.replay_segment(replayed, train_split(train), checkpoint, rtol=1e-13):
            pass  # checked: weights and running statistics of the next checkpoint
    np.testing.assert_array_equal(replayed[1].running_mean.detach().numpy(), buffers[-1, :6])


def train_split(train):
    from hydra_store.replay.recorded_run import as_split

    return as_split(train, "training")


def test_reverse_mode_equals_the_forward_recording(coupled_run):
    path, train, test, _, h, h_exact, trained = coupled_run
    summary = run_exact_analysis(path, inputs=RunInputs(coupled_net, train, test))
    trained.eval()  # the test loss: running statistics, no dropout
    loss = cross_entropy(trained(test[0]), test[1]).mean()
    u = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(trained.parameters()))])
    trained.train()
    for computed, hyper in ((summary.total_exact, h_exact), (summary.total_approx, h)):
        expected = (-(hyper @ u) / N_TRAIN).detach().numpy()
        np.testing.assert_allclose(computed, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_the_running_statistics_path_measured_by_central_differences(coupled_run):
    """The exact contribution leaves out d(running statistics)/d(eps) of the test loss (taken in
    eval mode): central differences of the full replay, which carry it, measure the gap."""
    path, train, test, *_ = coupled_run
    exact = run_exact_analysis(path, inputs=RunInputs(coupled_net, train, test)).total_exact
    trajectory = Trajectory(path)
    split = train_split(train)

    def test_loss(weights: np.ndarray) -> float:
        model = coupled_net()
        retrain_weighted(trajectory, model, split, weights)
        return evaluate(model, test[0], test[1])[0]

    delta = 1e-4
    differences = []
    for i in range(N_TRAIN):
        up, down = np.ones(N_TRAIN), np.ones(N_TRAIN)
        up[i], down[i] = 1 + N_TRAIN * delta, 1 - N_TRAIN * delta
        differences.append(-(test_loss(up) - test_loss(down)) / (2 * delta) / N_TRAIN)
    measured = np.asarray(differences)
    gap = np.abs(exact - measured).max() / np.abs(measured).max()
    # The running statistics move with eps, so the gap is not zero; it is small on this run.
    assert 1e-8 < gap < 0.2, f"relative gap {gap:.3g}"
    assert np.corrcoef(exact, measured)[0, 1] > 0.95


def plain_retraining_test_loss(path, train, test, left_out: int | None) -> float:
    """Leave-one-out retraining written plainly: torch.optim.SGD over the stored batches,
    learning rates and dropout seeds, the left-out sample's loss weighted 0, the model's own
    forward pass (updating its running statistics); the test loss in eval mode."""
    group = zarr.open_group(path, mode="r")
    batches = [row[row >= 0] for row in np.asarray(group["batch_index"][:])]
    seeds, lrs = np.asarray(group["step_seed"][:]), np.asarray(group["lr"][:])
    model = coupled_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    (x, y), (x_test, y_test) = train, test
    for batch, lr, seed in zip(batches, lrs, seeds, strict=True):
        for group_ in optimizer.param_groups:
            group_["lr"] = float(lr)
        weights = torch.ones(len(batch), dtype=torch.float64)
        weights[torch.from_numpy(batch == left_out)] = 0.0
        optimizer.zero_grad()
        with step_randomness(int(seed)):
            losses = cross_entropy(model(x[torch.from_numpy(batch)]), y[torch.from_numpy(batch)])
        (weights * losses).mean().backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return float(cross_entropy(model(x_test), y_test).mean())


def test_leave_one_out_retraining_equals_a_plain_training_loop(coupled_run):
    path, train, test, *_ = coupled_run
    summary = run_validation(
        path, inputs=RunInputs(coupled_net, train, test), samples=4, selection="random"
    )
    base = plain_retraining_test_loss(path, train, test, None)
    assert summary.base_loss == pytest.approx(base, rel=1e-12)
    for sample, change in zip(summary.samples, summary.loss_change, strict=True):
        expected = plain_retraining_test_loss(path, train, test, int(sample)) - base
        assert change == pytest.approx(expected, rel=1e-8, abs=1e-14)
    assert np.abs(summary.loss_change).max() > 1e-6


def test_a_batch_of_one_and_unsupported_layers_are_refused(tmp_path):
    model = coupled_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = hydra_store.HydraRecorder(model, optimizer, tmp_path / "one.zarr", n_train=4)
    with pytest.raises(InvalidArgumentError, match="BatchNorm needs at least 2 samples"), recorder:
        recorder.step(torch.zeros(1, 4).double(), torch.zeros(1, dtype=torch.long), [0])
    for layer, reason in (
        (nn.BatchNorm1d(4, track_running_stats=False), "keep track_running_stats=True"),
        (nn.RReLU(), "random slopes"),
        (nn.InstanceNorm1d(4, track_running_stats=True), "track_running_stats=False"),
    ):
        with pytest.raises(ModelError, match=reason):
            hydra_store.HydraRecorder(
                nn.Sequential(nn.Linear(4, 4), layer),
                torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1),
                tmp_path / "x.zarr",
                n_train=4,
            )
    assert not (tmp_path / "x.zarr").exists()


def test_a_run_whose_masks_were_drawn_on_another_device_is_refused(coupled_run, tmp_path):
    import shutil

    path, train, test, *_ = coupled_run
    copy = tmp_path / "cuda-masks.zarr"
    shutil.copytree(path, copy)
    zarr.open_group(copy, mode="r+")["step_seed"].attrs["device"] = "cuda"
    with pytest.raises(ReplayMismatchError, match="were drawn on cuda, and cpu draws other masks"):
        run_exact_analysis(copy, inputs=RunInputs(coupled_net, train, test))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_batch_norm_recording_on_cuda_matches_the_cpu_one(tmp_path):
    """BatchNorm without dropout (the masks of CPU and CUDA generators differ): hypergradients
    and running statistics of a CUDA recording against the CPU one."""
    from hydra_store.arguments import RecordConfig
    from hydra_store.recording.training import record_run

    runs = {}
    for device in ("cpu", "cuda"):
        config = RecordConfig(
            dataset="synthetic:n=128,channels=3,size=16,test=32",
            model="tests.user_plugins:batch_norm_cnn",
            epochs=2,
            batch_size=32,
            out=str(tmp_path / f"{device}.zarr"),
            device=device,
        )
        record_run(config)
        runs[device] = zarr.open_group(tmp_path / f"{device}.zarr", mode="r")
    for name in ("hypergradient", "buffers", "weights"):
        cpu, gpu = runs["cpu"][name][:], runs["cuda"][name][:]
        assert np.abs(cpu - gpu).max() <= 1e-3 * np.abs(cpu).max(), name
