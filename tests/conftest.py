"""Shared tiny runs. Session-scoped: recorded once, read by many tests (never modified in place;
tests that write copy the store first)."""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hydra_store.arguments import RecordConfig
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters
from hydra_store.data.datasets import load_dataset, subset
from hydra_store.data.models import build_model
from hydra_store.recording.recorder import HydraRecorder
from hydra_store.recording.training import record_run


@pytest.fixture(scope="session", autouse=True)
def full_float32_on_gpus():
    """The CUDA tests compare with the CPU in full float32, as the commands run
    (hydra_store_cli.common.full_float32_on_gpus; docs/recording.md, "On a GPU")."""
    if torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def coupled_net() -> torch.nn.Module:
    """A tiny batch-coupled model on 4 features: Linear, BatchNorm, ReLU, dropout, Linear to 3
    classes; float64, initial weights fixed."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.BatchNorm1d(6),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(6, 3),
    ).double()


def tiny_config(out: Path, **overrides) -> RecordConfig:
    """digits, an MLP, 3 epochs, momentum, weight decay and a step decay: seconds to record."""
    values = dict(
        dataset="digits",
        model="mlp:hidden=16",
        epochs=3,
        batch_size=64,
        lr=0.1,
        lr_step_epochs=2,
        out=str(out),
    )
    values.update(overrides)
    return RecordConfig(**values)


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's server mode) on 127.0.0.1, an ephemeral port, for
    the life of the test session; the AWS_* variables point s3fs at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(name, value)
        yield endpoint
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the local S3 server."""
    import s3fs

    name = f"hydra-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory) -> Path:
    """A complete store: digits, all 1,437 training samples tracked."""
    out = tmp_path_factory.mktemp("stores") / "digits.zarr"
    record_run(tiny_config(out))
    return out


@pytest.fixture(scope="session")
def noisy_digits_store(tmp_path_factory) -> Path:
    """digits with 50% of the training labels reassigned to wrong classes, 10 epochs."""
    out = tmp_path_factory.mktemp("stores") / "noisy.zarr"
    record_run(tiny_config(out, label_noise=0.5, epochs=10, lr_step_epochs=8))
    return out


@pytest.fixture()
def store_copy(digits_store, tmp_path) -> Path:
    """A private copy of the digits store for tests that write into it."""
    target = tmp_path / "copy.zarr"
    shutil.copytree(digits_store, target)
    return target


def small_digits(n_train: int = 22):
    bundle = load_dataset("digits", seed=0)
    return subset(bundle.train, np.arange(n_train))


def record_small_run(
    path, *, dtype=torch.float64, mode="both", epochs=3, batch_size=6, seed=0, **recorder_options
):
    """A float64 run on 22 digits (batches of 6: the last one of each epoch is partial), with
    momentum, weight decay and a learning rate that changes at every step."""
    train = small_digits()
    model = build_model("mlp:hidden=4", input_shape=(1, 8, 8), n_classes=10, seed=seed, dtype=dtype)
    initial = get_flat_parameters(model, ParameterLayout.from_model(model)).clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.93)
    generator = torch.Generator().manual_seed(seed)
    n = len(train)
    recorder = HydraRecorder(
        model,
        optimizer,
        path,
        n_train=n,
        tracked=[0, 4, 5, 9, 13, 21],
        mode=mode,
        **recorder_options,
    )
    with recorder:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                recorder.step(train.inputs[index].to(dtype), train.targets[index], index)
                scheduler.step()
            recorder.end_epoch()
        h = recorder.hypergradients().clone()
        h_exact = recorder.hypergradients(exact=True).clone() if mode == "both" else None
    return train, model, initial, h, h_exact


def regression_data(seed: int = 0, n_train: int = 20, n_test: int = 8):
    """A small float64 regression problem: y = sin(x . a) + noise, x in R^3, y in R (as (n, 1))."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)

    def draw(n):
        x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        y = torch.sin(x @ a)[:, None] + 0.1 * torch.randn(
            n, 1, generator=generator, dtype=torch.float64
        )
        return x, y

    return draw(n_train), draw(n_test)


def regression_model(seed: int = 0) -> torch.nn.Module:
    """3 -> 5 (tanh) -> 1, float64, initial weights fixed by `seed`."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).double()


def record_regression_run(path, *, loss="mse", mode="both", epochs=3, batch_size=6, seed=0):
    """Train `regression_model` on `regression_data` with SGD (momentum, weight decay, a
    decaying learning rate) around `HydraRecorder(loss=...)`, tracking every sample; returns
    ((x, y), (x_test, y_test), initial weights, h, h_exact)."""
    (x, y), test = regression_data(seed)
    model = regression_model(seed)
    initial = get_flat_parameters(model, ParameterLayout.from_model(model)).clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    recorder = HydraRecorder(model, optimizer, path, n_train=n, mode=mode, loss=loss)
    with recorder:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                recorder.step(x[index], y[index], index)
                scheduler.step()
            recorder.end_epoch()
        h = recorder.hypergradients().clone()
        h_exact = recorder.hypergradients(exact=True).clone() if mode == "both" else None
    return (x, y), test, initial, h, h_exact


def unrolled_final_weights(
    store, model, x, y, initial, sample_loss, *, detach_gradients: bool
) -> torch.Tensor:
    """dw_T/d(eps) (N, P) by `jacfwd` through the training replayed in plain PyTorch from the
    stored batches, learning rates, momentum, weight decay and dropout seeds: step t's loss is
    sum_j (1/B_t + eps_j N/B_t) l_j(w), each l_j through the batch's statistics (BatchNorm in
    training mode, running statistics left alone). With `detach_gradients` the per-sample
    gradients are taken at detached weights, which drops the Hessian (the approximate
    recurrence's derivative)."""
    from torch.func import functional_call, grad, jacfwd

    from hydra_store.core.model_state import frozen_running_stats, step_randomness

    group = zarr.open_group(store, mode="r")
    batches = [row[row >= 0] for row in np.asarray(group["batch_index"][:])]
    lrs = np.asarray(group["lr"][:])
    momentum, decay = float(group["momentum"][0]), float(group["weight_decay"][0])
    seeds = np.asarray(group["step_seed"][:]) if "step_seed" in group else [None] * len(lrs)
    layout = ParameterLayout.from_model(model)
    n = x.shape[0]

    def final_weights(eps):
        w, v = initial, torch.zeros_like(initial)
        for batch, lr, seed in zip(batches, lrs, seeds, strict=True):
            index = torch.from_numpy(batch)
            weights = 1.0 / index.numel() + eps[index] * n / index.numel()

            def loss(flat, index=index, weights=weights):
                with frozen_running_stats(model):
                    outputs = functional_call(model, layout.unflatten(flat), (x[index],))
                return (weights * sample_loss(outputs, y[index])).sum()

            with step_randomness(None if seed is None else int(seed)):
                g = grad(loss)(w.detach() if detach_gradients else w)
            v = momentum * v + g + decay * w
            w = w - float(lr) * v
        return w

    return jacfwd(final_weights, randomness="same")(torch.zeros(n, dtype=torch.float64)).T
