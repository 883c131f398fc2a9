"""The exact data a run trains on: the data set of its configuration, with the injected label
noise, and the fingerprints that let a rebuilt copy be checked against the recorded one."""

from __future__ import annotations

import numpy as np
import torch

from hydra_store.arguments import RecordConfig
from hydra_store.data.datasets import DatasetBundle, Split, fingerprint, load_dataset


def apply_label_noise(
    targets: np.ndarray, n_classes: int, rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reassign `rate` of the labels, chosen at random, uniformly to a *different* class.

    Returns (noisy labels, boolean mask of the reassigned samples).
    """
    targets = np.asarray(targets, dtype=np.int64)
    noisy = targets.copy()
    mask = np.zeros(targets.size, dtype=bool)
    if rate <= 0:
        return noisy, mask
    rng = np.random.default_rng([seed, 0x1AB31])
    chosen = rng.choice(targets.size, size=round(rate * targets.size), replace=False)
    shift = rng.integers(1, n_classes, size=chosen.size)
    noisy[chosen] = (targets[chosen] + shift) % n_classes
    mask[chosen] = True
    return noisy, mask


def load_training_data(config: RecordConfig) -> tuple[DatasetBundle, np.ndarray, np.ndarray]:
    """The data set of a run: (bundle, labels used in training, clean labels)."""
    bundle = load_dataset(
        config.dataset,
        data_root=config.data_root,
        seed=config.seed,
        validation_fraction=config.validation_fraction,
    )
    clean = bundle.train.targets.numpy().astype(np.int64)
    noisy, _ = apply_label_noise(clean, len(bundle.class_names), config.label_noise, config.seed)
    return bundle, noisy, clean


def dataset_attrs(bundle: DatasetBundle, train_labels: np.ndarray) -> dict:
    """The root attribute `dataset`: names, shapes, split sizes and sha256 fingerprints."""
    train = Split(bundle.train.inputs, torch.from_numpy(train_labels), bundle.train.source_index)
    attrs = {
        "name": bundle.name,
        "class_names": list(bundle.class_names),
        "input_shape": list(bundle.input_shape),
        "is_image": bundle.is_image,
        "n_train": len(bundle.train.targets),
        "n_test": len(bundle.test.targets),
        "n_validation": 0 if bundle.validation is None else len(bundle.validation.targets),
        "train_fingerprint": fingerprint(train),
        "test_fingerprint": fingerprint(bundle.test),
    }
    if bundle.validation is not None:
        attrs["validation_fingerprint"] = fingerprint(bundle.validation)
    return attrs
