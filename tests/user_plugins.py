"""User plug-ins the tests load through 'tests.user_plugins:<function>' specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from hydra_store.data.datasets import DatasetBundle, Split


def vector_data(seed: int) -> dict[str, np.ndarray]:
    """Two well separated Gaussian blobs in 3-D, 40 train / 10 test samples."""
    rng = np.random.default_rng(seed)
    y_train = np.arange(40) % 2
    y_test = np.arange(10) % 2
    return {
        "x_train": rng.normal(size=(40, 3)) + 4.0 * y_train[:, None],
        "y_train": y_train,
        "x_test": rng.normal(size=(10, 3)) + 4.0 * y_test[:, None],
        "y_test": y_test,
        "class_names": np.array(["low", "high"]),
    }


def data_from_root(seed: int, data_root: Path | None) -> dict[str, np.ndarray]:
    """Reads 'plugin.npz' from the data root, as a real plug-in would read its own files."""
    if data_root is None:
        raise ValueError("this data set needs a data root")
    with np.load(Path(data_root) / "plugin.npz") as npz:
        return {k: npz[k] for k in npz.files}


def bundle_data(seed: int) -> DatasetBundle:
    """A ready-made bundle of 2x2 single-channel images, its name deliberately not the spec."""
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(
            inputs=torch.rand((n, 1, 2, 2), generator=gen),
            targets=torch.arange(n) % 3,
            source_index=np.arange(n, dtype=np.int64),
        )

    return DatasetBundle(
        name="whatever",
        train=split(9),
        test=split(6),
        validation=None,
        class_names=("a", "b", "c"),
        input_shape=(1, 2, 2),
        is_image=True,
    )


def failing_data(seed: int) -> dict[str, np.ndarray]:
    raise RuntimeError("the plug-in's own failure")


def wrong_type_data(seed: int) -> int:
    return 42


def tiny_model(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, n_classes))


def wrong_output_model(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    d = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(d, n_classes + 1))


def fixed_input_model(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """Ignores input_shape: only runs on 4-feature inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(4, n_classes))


def not_a_model(input_shape: tuple[int, ...], n_classes: int) -> str:
    return "a model"


def pseudo_huber(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user's per-sample regression loss (pseudo-Huber, delta 1), imported by spec."""
    error = outputs.reshape(outputs.shape[0], -1) - targets.reshape(targets.shape[0], -1)
    return (torch.sqrt(1.0 + error.square()) - 1.0).sum(dim=1)


def batch_norm_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A convolution with BatchNorm and no dropout (CPU and CUDA runs comparable)."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, n_classes),
    )
