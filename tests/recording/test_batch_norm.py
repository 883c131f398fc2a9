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
from hydra_store.core.fingerprints import fingerprint_direction
from hydra_store.core.gradients import batched_backward_gradients, evaluate
from hydra_store.core.losses import cross_entropy
from hydra_store.core.model_state import step_randomness
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters, set_flat_parameters
from hydra_store.core.projection import CountSketchProjector
from hydra_store.errors import InvalidArgumentError, ModelError, ReplayMismatchError
from hydra_store.recording.durable import write_durable_point
from hydra_store.recording.partitions import TrainingData, run_partitions
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.arrays import writable
from hydra_store.store.format import consolidate
from tests.conftest import coupled_net, unrolled_final_weights

N_TRAIN, N_TEST = 16, 10


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


@pytest.fixture(scope="module")
def unrolled(coupled_run):
    """dw_T/d(eps) of every sample by jacfwd through the unrolled training: (without the
    Hessian, with it)."""
    path, (x, y), _, initial, *_ = coupled_run
    args = (path, coupled_net(), x, y, initial, cross_entropy)
    return tuple(unrolled_final_weights(*args, detach_gradients=d) for d in (True, False))


def test_hypergradients_equal_autograd_through_the_unrolled_training(coupled_run, unrolled):
    _, _, _, _, h, h_exact, _ = coupled_run
    approx, exact = unrolled
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


TRACKED = [1, 4, 6, 11, 15]
# Both recurrences with momentum, float64: (63 + 63) parameters x 8 bytes x 2 per tracked row.
COUPLED_ROW_BYTES = 2016


def record_tracked_run(path, mode="both", build=coupled_net, **options):
    """`record_coupled_run`'s training (the same batches, masks and settings) with only
    TRACKED tracked, finished with its training data (a small `memory_budget` records it in
    partitions), of the model `build` makes: the recorder and its store."""
    (x, y), _ = data()
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    generator = torch.Generator().manual_seed(2)
    recorder = hydra_store.HydraRecorder(
        model, optimizer, path, n_train=N_TRAIN, tracked=TRACKED, mode=mode, seed=3, **options
    )
    with recorder:
        for _ in range(2):
            for index in torch.randperm(N_TRAIN, generator=generator).split(6):
                recorder.step(x[index], y[index], index)
            recorder.end_epoch()
        recorder.finish(training_data=TrainingData(build(), x, y))
    return recorder, zarr.open_group(path, mode="r")


class _PlainReLU(torch.autograd.Function):
    """ReLU as an autograd.Function with a backward and no forward-mode derivative (the old
    style: `forward` takes `ctx`), as some users' custom layers are."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _PlainReLUModule(nn.Module):
    def forward(self, x):
        return _PlainReLU.apply(x)


def net_without_forward_mode() -> nn.Module:
    """`coupled_net` with its ReLU an autograd.Function that has no jvp."""
    model = coupled_net()
    model[2] = _PlainReLUModule()
    return model


def test_a_tracked_subset_takes_only_its_rows_and_the_same_steps(coupled_run, unrolled, tmp_path):
    """A coupled model's step takes the per-sample gradients of its tracked slots only and one
    backward pass for the step: the weights are the all-tracked run's to the bit, the rows are
    autograd's through the unrolled training, and replay retakes the steps to the bit."""
    path, (x, y), _, _, h, h_exact, _ = coupled_run
    recorder, subset = record_tracked_run(tmp_path / "subset.zarr")
    assert subset.attrs["step_gradient"] == "batch_backward"
    assert zarr.open_group(path, mode="r").attrs["step_gradient"] == "batch_backward"
    np.testing.assert_array_equal(subset["weights"][:], zarr.open_group(path)["weights"][:])
    np.testing.assert_array_equal(subset["buffers"][:], zarr.open_group(path)["buffers"][:])
    approx, exact = (rows[TRACKED] for rows in unrolled)
    for is_exact, expected, everyone in ((False, approx, h), (True, exact, h_exact)):
        rows = recorder.hypergradients(is_exact)
        assert (rows - expected).abs().max() <= 1e-10 * expected.abs().max(), is_exact
        torch.testing.assert_close(rows, everyone[TRACKED], rtol=1e-12, atol=0)
        name = "hypergradient_exact" if is_exact else "hypergradient"
        np.testing.assert_array_equal(subset[name][:], rows.float().numpy())
    replayed = coupled_net()
    for checkpoint in range(2):
        segment = Trajectory(subset.store.root).replay_segment(
            replayed, train_split((x, y)), checkpoint, rtol=0.0
        )
        for _ in segment:
            pass  # checked: weights and running statistics equal the next checkpoint's


@pytest.fixture(scope="module")
def partitioned_pair(tmp_path_factory):
    """The tracked-subset run in memory and in 3 partitions: (memory store, recorder, parts)."""
    folder = tmp_path_factory.mktemp("bn-parts")
    _, memory = record_tracked_run(folder / "memory.zarr")
    recorder, parts = record_tracked_run(folder / "parts.zarr", memory_budget=2 * COUPLED_ROW_BYTES)
    return memory, recorder, parts


def test_a_partitioned_coupled_run_equals_the_in_memory_one(partitioned_pair):
    """Training takes the tracked slots' rows and fingerprints every slot by a jvp; the
    partitions recompute their own slots' rows from the whole batch's forward pass."""
    memory, recorder, parts = partitioned_pair
    assert recorder.plan.partitioned and recorder.plan.n_partitions == 3
    assert parts.attrs["status"] == "complete"
    assert parts.attrs["step_gradient"] == "batch_backward"
    np.testing.assert_array_equal(parts["weights"][:], memory["weights"][:])
    np.testing.assert_array_equal(parts["buffers"][:], memory["buffers"][:])
    for name in ("hypergradient", "hypergradient_exact"):
        expected = np.asarray(memory[name][:])
        assert np.abs(expected).max() > 1e-2
        # float32 in the store; the two runs' float64 rows differ by ~1e-15 before rounding.
        np.testing.assert_allclose(
            parts[name][:], expected, rtol=0, atol=2**-22 * np.abs(expected).max(), err_msg=name
        )


def test_a_partitioned_coupled_runs_fingerprints_are_every_slots_gradient_along_u(
    partitioned_pair,
):
    """Each stored fingerprint against <g_i, u> of the slot's full per-sample gradient (one
    backward vector per slot, the masks of the step), and the stored scale against its
    formula: max(|mean gradient|, sqrt(P mean f^2)), which here lies within a factor 3 of the
    exact root-mean-square norm it stands for."""
    _, _, parts = partitioned_pair
    (x, y), _ = data()
    model = coupled_net()
    layout = ParameterLayout.from_model(model)
    direction = fingerprint_direction(
        layout.n_params, int(parts.attrs["partitions"]["fingerprint_seed"])
    )
    weights = np.asarray(parts["step_weights"][:])
    batches = np.asarray(parts["batch_index"][:])
    seeds = np.asarray(parts["step_seed"][:])
    stored = np.asarray(parts["gradient_fingerprint"][:])
    scales = np.asarray(parts["gradient_scale"][:])
    ratios = []
    for step, (flat, row, seed) in enumerate(zip(weights, batches, seeds, strict=True)):
        batch = torch.from_numpy(row[row >= 0])
        set_flat_parameters(model, layout, torch.from_numpy(flat))
        with step_randomness(int(seed)):
            rows = batched_backward_gradients(model, layout, x[batch], y[batch])[1]
        naive = (rows @ direction).numpy()
        np.testing.assert_allclose(
            stored[step, : batch.numel()], naive, rtol=0, atol=1e-12 * np.abs(naive).max()
        )
        spread = np.sqrt(layout.n_params * np.mean(naive**2))
        mean_norm = float(rows.mean(0).norm())
        tracked = torch.from_numpy(np.isin(batch.numpy(), TRACKED))
        formed = float(rows[tracked].norm()) / batch.numel() ** 0.5
        assert scales[step] == pytest.approx(max(mean_norm, formed, spread), rel=1e-10)
        ratios.append(scales[step] / float(rows.norm(dim=1).pow(2).mean().sqrt()))
    assert min(ratios) > 1 / 3 and max(ratios) < 3, ratios


def test_a_projected_partitioned_coupled_run_reads_its_log_and_equals_the_in_memory_one(
    tmp_path,
):
    """A projected run's partitions read the projected gradients training logged for its
    tracked slots (nothing recomputed): the in-memory projected run's rows, to the bit."""
    projector = CountSketchProjector(63, 16, seed=5)
    options = {"mode": "approximate", "projector": projector}
    _, memory = record_tracked_run(tmp_path / "memory.zarr", **options)
    recorder, parts = record_tracked_run(tmp_path / "parts.zarr", memory_budget=600, **options)
    assert recorder.plan.partitioned and parts.attrs["partitions"]["gradient_log"]
    assert parts.attrs["step_gradient"] == "batch_backward"
    assert np.abs(memory["hypergradient"][:]).max() > 1e-2
    np.testing.assert_array_equal(parts["hypergradient"][:], memory["hypergradient"][:])


def test_a_model_without_forward_mode_derivatives_is_fingerprinted_from_every_row(tmp_path):
    """A partitioned step fingerprints every slot by a jvp; a model with an operation that has
    none (an old-style autograd.Function) takes every slot's row instead, from the first step
    on, and records what the in-memory run records."""
    options = {"mode": "approximate", "build": net_without_forward_mode}
    _, memory = record_tracked_run(tmp_path / "memory.zarr", **options)
    recorder, parts = record_tracked_run(
        tmp_path / "parts.zarr", memory_budget=2 * COUPLED_ROW_BYTES, **options
    )
    assert recorder.plan.partitioned and recorder._forward_mode_fingerprints is False
    np.testing.assert_array_equal(parts["weights"][:], memory["weights"][:])
    expected = np.asarray(memory["hypergradient"][:])
    assert np.abs(expected).max() > 1e-2
    np.testing.assert_allclose(
        parts["hypergradient"][:], expected, rtol=0, atol=2**-22 * np.abs(expected).max()
    )


def test_partitions_refuse_masks_drawn_on_another_kind_of_device(tmp_path):
    """A GPU run's partitions recorded again on the CPU (`record --resume` where no GPU is
    visible) would draw other dropout masks: refused in one line, not a fingerprint error."""
    path = tmp_path / "parts.zarr"
    record_tracked_run(path, memory_budget=2 * COUPLED_ROW_BYTES)
    group = zarr.open_group(path, mode="r+")
    writable(group["partition_done"])[:] = False
    group["step_seed"].attrs["device"] = "cuda"
    consolidate(path)
    (x, y), _ = data()
    with pytest.raises(ReplayMismatchError, match="drawn on cuda, and cpu draws other masks"):
        run_partitions(path, TrainingData(coupled_net(), x, y))


def test_a_store_whose_steps_took_the_per_sample_mean_resumes_taking_it(tmp_path):
    """A recording begun by a hydra-store that stepped a coupled model with the mean of every
    slot's gradient (`step_gradient: per_sample_mean`) goes on that way when resumed, so that
    replay, which takes the store's word for it, retakes the resumed steps to the bit."""
    (x, y), _ = data()
    path = tmp_path / "older.zarr"
    batches = list(torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(2)).split(6))

    def recorder_for(model, **options):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        return hydra_store.HydraRecorder(
            model, optimizer, path, n_train=N_TRAIN, tracked=TRACKED, seed=3, **options
        )

    first = recorder_for(coupled_net())
    for index in batches:
        first.step(x[index], y[index], index)
    first.end_epoch()
    first.store.update_attrs({"step_gradient": "per_sample_mean"})  # as the older one wrote
    write_durable_point(first, {}, {"epoch": 1, "step_in_epoch": 0})
    first.fail("stopped after a durable point")
    resumed = recorder_for(coupled_net(), resume=True)
    with resumed:
        for index in batches:
            resumed.step(x[index], y[index], index)
        resumed.end_epoch()
    group = zarr.open_group(path, mode="r")
    assert group.attrs["status"] == "complete"
    assert group.attrs["step_gradient"] == "per_sample_mean"
    replayed = coupled_net()
    trajectory = Trajectory(path)
    trajectory.load_checkpoint(replayed, 1)
    for _ in trajectory.replay_segment(replayed, train_split((x, y)), 1, rtol=0.0):
        pass  # checked: the weights and running statistics of checkpoint 2, to the bit


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
