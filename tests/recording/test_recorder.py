"""The recorder against independent computations: autograd through the unrolled training, and
plain `loss.backward()` + `SGD.step()`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from hydra_store.arguments import RecordConfig
from hydra_store.core.gradients import per_sample_loss
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
from hydra_store.core.sketched_gradients import tensor_sketch_projector
from hydra_store.data.models import build_model
from hydra_store.errors import InvalidArgumentError, ModelError, UnsupportedOptimizerError
from hydra_store.recording.recorder import HydraRecorder
from hydra_store.recording.training import record_run
from hydra_store.replay.trajectory import replay_training
from tests.conftest import record_small_run, small_digits, tiny_config, unrolled_final_weights


def test_hypergradient_equals_autograd_through_unrolled_training(tmp_path):
    store = tmp_path / "run.zarr"
    train, model, initial, h, h_exact = record_small_run(store)
    tracked = np.asarray(zarr.open_group(store)["sample"][:])

    x = train.inputs.double()
    approx = unrolled_final_weights(
        store, model, x, train.targets, initial, per_sample_loss, detach_gradients=True
    )[tracked]
    scale = approx.abs().max()
    assert scale > 1e-3
    assert (h - approx).abs().max() / scale < 1e-8

    exact = unrolled_final_weights(
        store, model, x, train.targets, initial, per_sample_loss, detach_gradients=False
    )[tracked]
    assert (h_exact - exact).abs().max() / exact.abs().max() < 1e-8
    # How far the Hessian-free approximation is from the exact derivative on this run (the
    # approximation is not exact; the paper bounds the difference): cosine similarity per sample.
    cosine = torch.nn.functional.cosine_similarity(h, exact, dim=1)
    relative = ((h - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert 0.0 < relative < 1.0, f"approximation relative error {relative:.3f}"
    assert cosine.min() > 0.5, f"cosines {cosine.tolist()}"


def test_store_holds_the_recorded_hypergradients(tmp_path):
    store = tmp_path / "run.zarr"
    _, _, _, h, h_exact = record_small_run(store)
    group = zarr.open_group(store, mode="r")
    assert group.attrs["status"] == "complete"
    np.testing.assert_allclose(group["hypergradient"][:], h.numpy().astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(
        group["hypergradient_exact"][:], h_exact.numpy().astype(np.float32), rtol=1e-6
    )


def test_a_sketched_recording_equals_the_full_path_with_the_same_projector(tmp_path):
    """The tensor sketch's projected gradients from one backward pass against the same
    projector applied to full per-sample gradients (float64): the same hypergradients; the
    sketched store says its steps took one backward pass."""
    model = build_model("mlp:hidden=4", input_shape=(1, 8, 8), n_classes=10, seed=0)
    projector = tensor_sketch_projector(model, 40, seed=1)
    _, _, _, sketched, _ = record_small_run(
        tmp_path / "s.zarr", mode="approximate", projector=projector
    )
    _, _, _, full, _ = record_small_run(
        tmp_path / "f.zarr", mode="approximate", projector=projector, sketch_gradients=False
    )
    assert (sketched - full).abs().max() <= 1e-10 * full.abs().max()
    assert zarr.open_group(tmp_path / "s.zarr").attrs["step_gradient"] == "sketched_backward"
    assert zarr.open_group(tmp_path / "f.zarr").attrs["step_gradient"] == "per_sample_mean"


def test_a_sketched_built_in_run_replays_to_the_bit(tmp_path):
    """`record --project-dim` of LeNet-5 (float32, a tensor sketch; the convolutions' weight
    gradients summed from their per-sample gradients): replay takes the step gradients the
    same way and reproduces the final weights exactly."""
    out = tmp_path / "p.zarr"
    data = "synthetic:n=300,size=28,test=50"
    record_run(tiny_config(out, dataset=data, model="lenet5", epochs=1, project_dim=64))
    group = zarr.open_group(out, mode="r")
    assert group.attrs["projection"]["kind"] == "tensor-sketch"
    assert group.attrs["step_gradient"] == "sketched_backward"
    np.testing.assert_array_equal(replay_training(out).numpy(), group["weights"][-1])


class _WeightUsedTwice(torch.nn.Module):
    """A Linear layer whose weight is also used outside the layer's call."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(64, 8)
        self.out = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x.flatten(1)))
        return self.out(h) + h @ self.out.weight.T


def test_a_model_the_hooks_cannot_see_records_plain_backward_steps(tmp_path):
    """The sketched path's first check fails: full per-sample gradients, one plain backward
    pass per step, and the store says so (replay then takes plain backward passes)."""
    train = small_digits(24)
    model = _WeightUsedTwice().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    projector = tensor_sketch_projector(model, 32)
    recorder = HydraRecorder(model, optimizer, tmp_path / "w.zarr", n_train=24, projector=projector)
    assert recorder.store.group.attrs["step_gradient"] == "sketched_backward"
    for start in (0, 8, 16):
        index = torch.arange(start, start + 8)
        recorder.step(train.inputs[index].double(), train.targets[index], index)
    assert recorder.sketched.hooks_exact is False
    recorder.finish()
    assert zarr.open_group(tmp_path / "w.zarr").attrs["step_gradient"] == "batch_backward"


def test_training_step_equals_backward_and_sgd_step(tmp_path):
    train = small_digits(64)
    model = build_model("mlp:hidden=8", input_shape=(1, 8, 8), n_classes=10, seed=1)
    reference = build_model("mlp:hidden=8", input_shape=(1, 8, 8), n_classes=10, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    recorder = HydraRecorder(model, opt, tmp_path / "s.zarr", n_train=64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        index = torch.randperm(64, generator=generator)[:16]
        x, y = train.inputs[index], train.targets[index]
        loss = recorder.step(x, y, index)
        ref_opt.zero_grad()
        ref_loss = per_sample_loss(reference(x), y).mean()
        ref_loss.backward()
        ref_opt.step()
        assert loss == pytest.approx(float(ref_loss), rel=1e-6)
    recorder.finish()
    layout = ParameterLayout.from_model(model)
    got, want = get_flat_parameters(model, layout), get_flat_parameters(reference, layout)
    assert (got - want).abs().max() < 1e-6
    assert (
        want
        - get_flat_parameters(
            build_model("mlp:hidden=8", input_shape=(1, 8, 8), n_classes=10, seed=1), layout
        )
    ).abs().max() > 1e-2


def test_recorder_reads_the_learning_rate_at_every_step(tmp_path):
    train = small_digits(30)
    model = build_model("logreg", input_shape=(1, 8, 8), n_classes=10, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    recorder = HydraRecorder(model, opt, tmp_path / "lr.zarr", n_train=30)
    lrs = [0.5, 0.25, 0.1, 0.3]
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        recorder.step(train.inputs[:10], train.targets[:10], np.arange(10))
    recorder.finish()
    np.testing.assert_allclose(zarr.open_group(tmp_path / "lr.zarr")["lr"][:], lrs)


def test_unsupported_optimizer_and_layers_are_refused_before_writing(tmp_path):
    model = build_model("logreg", input_shape=(1, 8, 8), n_classes=10)
    out = tmp_path / "never.zarr"
    with pytest.raises(UnsupportedOptimizerError, match="SGD"):
        HydraRecorder(model, torch.optim.Adam(model.parameters()), out, n_train=10)
    nesterov = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(UnsupportedOptimizerError, match="Nesterov"):
        HydraRecorder(model, nesterov, out, n_train=10)
    partial = torch.optim.SGD(list(model.parameters())[:1], lr=0.1)
    with pytest.raises(UnsupportedOptimizerError, match="exactly the model"):
        HydraRecorder(model, partial, out, n_train=10)
    bn = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
        torch.nn.BatchNorm1d(10, affine=False, track_running_stats=False),
    )
    with pytest.raises(ModelError, match="BatchNorm1d, which hydra-store does not support"):
        HydraRecorder(bn, torch.optim.SGD(bn.parameters(), lr=0.1), out, n_train=10)
    assert not out.exists()


def test_bad_batches_are_refused_with_named_errors(tmp_path):
    model = build_model("logreg", input_shape=(1, 8, 8), n_classes=10)
    recorder = HydraRecorder(
        model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "b.zarr", n_train=10
    )
    x, y = torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 10\)"):
        recorder.step(x, y, [0, 1, 10])
    with pytest.raises(InvalidArgumentError, match="one entry per sample"):
        recorder.step(x, y, [0, 1])


def test_exception_inside_the_recording_marks_the_store_failed(tmp_path):
    model = build_model("logreg", input_shape=(1, 8, 8), n_classes=10)
    path = tmp_path / "f.zarr"
    recorder = HydraRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), path, n_train=10)
    with pytest.raises(RuntimeError), recorder:
        recorder.step(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.int64), [0, 1])
        raise RuntimeError("boom")
    attrs = zarr.open_group(path).attrs
    assert attrs["status"] == "failed"
    assert "boom" in attrs["failure"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("project_dim", [None, 256])  # 256: sketched per-sample gradients
def test_cuda_recording_matches_cpu(tmp_path, project_dim):
    runs = {}
    for device in ("cpu", "cuda"):
        config = RecordConfig(
            model="mlp:hidden=16",
            epochs=2,
            lr=0.1,
            out=str(tmp_path / f"{device}.zarr"),
            device=device,
            project_dim=project_dim,
        )
        record_run(config)
        runs[device] = zarr.open_group(tmp_path / f"{device}.zarr")
    h_cpu, h_gpu = runs["cpu"]["hypergradient"][:], runs["cuda"]["hypergradient"][:]
    assert runs["cuda"].attrs["status"] == "complete"
    assert np.abs(h_cpu - h_gpu).max() / np.abs(h_cpu).max() < 1e-3
    np.testing.assert_array_equal(runs["cpu"]["batch_index"][:], runs["cuda"]["batch_index"][:])
