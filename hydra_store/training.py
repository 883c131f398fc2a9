"""The built-in training run behind `hydra-store record`: data, model, SGD, schedule, recorder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hydra_store.config import RecordConfig
from hydra_store.data import DatasetBundle, Split, fingerprint, load_dataset
from hydra_store.errors import InvalidArgumentError
from hydra_store.hypergradient import per_sample_loss
from hydra_store.models import build_model
from hydra_store.recorder import EpochRecord, HydraRecorder
from hydra_store.schedules import EpochSchedule
from hydra_store.store import check_output_path


@dataclass(frozen=True)
class Progress:
    """What the CLI's progress bar shows; the library itself never prints."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    loss: float
    samples_per_second: float


@dataclass(frozen=True)
class RecordSummary:
    path: Path
    epochs: tuple[EpochRecord, ...]
    n_train: int
    n_tracked: int
    n_params: int
    seconds: float
    training_seconds: float
    samples_per_second: float
    store_bytes: int


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


def select_tracked(track: str, labels: np.ndarray, seed: int) -> np.ndarray:
    """'all'; a count drawn stratified by class (largest-remainder allocation); or an index file
    (.npy, or text with whitespace-separated integers)."""
    n = labels.size
    if track == "all":
        return np.arange(n)
    if track.isdigit():
        count = int(track)
        if count > n:
            raise InvalidArgumentError(
                f"--track {count}: the training set has only {n} samples; use --track all"
            )
        rng = np.random.default_rng([seed, 0x7AC4])
        classes, sizes = np.unique(labels, return_counts=True)
        quota = sizes * count / n
        take = np.floor(quota).astype(int)
        remainder = count - take.sum()
        take[np.argsort(-(quota - take), kind="stable")[:remainder]] += 1
        chosen = [
            rng.choice(np.nonzero(labels == c)[0], size=k, replace=False)
            for c, k in zip(classes, take, strict=True)
        ]
        return np.sort(np.concatenate(chosen))
    path = Path(track)
    try:
        index = (
            np.load(path)
            if path.suffix == ".npy"
            else np.array(path.read_text().split(), dtype=np.int64)
        )
    except (OSError, ValueError) as error:
        raise InvalidArgumentError(f"--track {track}: cannot read indices ({error})") from error
    index = np.asarray(index).reshape(-1)
    if index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise InvalidArgumentError(f"--track {track}: the file must hold integer indices")
    if index.min() < 0 or index.max() >= n or np.unique(index).size != index.size:
        raise InvalidArgumentError(f"--track {track}: indices must be distinct and lie in [0, {n})")
    return index.astype(np.int64)


def evaluate(
    model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 1024
) -> tuple[float, float]:
    """Mean loss and accuracy of the model on a split."""
    total_loss, correct = 0.0, 0
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        for start in range(0, len(split.targets), batch_size):
            x = split.inputs[start : start + batch_size].to(device, dtype)
            y = split.targets[start : start + batch_size].to(device)
            logits = model(x)
            total_loss += float(per_sample_loss(logits, y).sum())
            correct += int((logits.argmax(1) == y).sum())
    n = max(1, len(split.targets))
    return total_loss / n, correct / n


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            "--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu"
        )
    return torch.device(name)


@dataclass(frozen=True)
class PreparedRun:
    """Everything a run needs, built and validated before the store is created."""

    config: RecordConfig
    bundle: DatasetBundle
    train_labels: np.ndarray
    clean_labels: np.ndarray | None
    model: torch.nn.Module
    tracked: np.ndarray
    device: torch.device


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


def prepare_run(config: RecordConfig) -> PreparedRun:
    """Validate the configuration and build data and model (nothing is written)."""
    config.validate()
    device = resolve_device(config.device)
    bundle, noisy, clean = load_training_data(config)
    model = build_model(
        config.model,
        input_shape=bundle.input_shape,
        n_classes=len(bundle.class_names),
        seed=config.seed,
    ).to(device)
    tracked = select_tracked(config.track, noisy, config.seed)
    check_output_path(Path(config.out), config.overwrite)
    return PreparedRun(
        config=config,
        bundle=bundle,
        train_labels=noisy,
        clean_labels=clean if config.label_noise > 0 else None,
        model=model,
        tracked=tracked,
        device=device,
    )


def dataset_attrs(bundle: DatasetBundle, train_labels: np.ndarray) -> dict:
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


def record_run(
    config: RecordConfig,
    *,
    progress: Callable[[Progress], None] | None = None,
    prepared: PreparedRun | None = None,
) -> RecordSummary:
    """Train with SGD and record the HyDRA hypergradients of the tracked samples into a store."""
    started = time.perf_counter()
    run = prepared or prepare_run(config)
    bundle, device, model = run.bundle, run.device, run.model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    n_train = len(bundle.train.targets)
    steps_per_epoch = -(-n_train // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    schedule = EpochSchedule(optimizer, config.schedule_spec(), total_steps)
    recorder = HydraRecorder(
        model,
        optimizer,
        config.out,
        n_train=n_train,
        tracked=run.tracked,
        train_labels=run.train_labels,
        clean_labels=run.clean_labels,
        mode=config.mode,
        checkpoint_every=config.checkpoint_every,
        hypergradient_history=config.hypergradient_history,
        config=config.to_attrs(),
        attrs={"dataset": dataset_attrs(bundle, run.train_labels)},
        overwrite=config.overwrite,
    )
    store = recorder.store
    store.create_array("train_label", run.train_labels, dims=("train",))
    store.create_array("train_source_index", bundle.train.source_index, dims=("train",))
    store.create_array("test_label", bundle.test.targets.numpy(), dims=("test",))
    store.create_array("test_source_index", bundle.test.source_index, dims=("test",))
    if bundle.validation is not None:
        store.create_array(
            "validation_source_index", bundle.validation.source_index, dims=("validation",)
        )
    inputs = bundle.train.inputs.to(device)
    labels = torch.from_numpy(run.train_labels).to(device)
    generator = torch.Generator().manual_seed(config.seed)
    training_seconds = 0.0
    with recorder:
        for epoch in range(config.epochs):
            order = torch.randperm(n_train, generator=generator)
            tick = time.perf_counter()
            for k, start in enumerate(range(0, n_train, config.batch_size)):
                index = order[start : start + config.batch_size]
                device_index = index.to(device)
                loss = recorder.step(inputs[device_index], labels[device_index], index)
                schedule.after_step()
                if progress is not None:
                    elapsed = time.perf_counter() - tick
                    done = min(n_train, start + config.batch_size)
                    progress(
                        Progress(
                            epoch + 1,
                            config.epochs,
                            epoch * steps_per_epoch + k + 1,
                            total_steps,
                            loss,
                            done / elapsed if elapsed > 0 else 0.0,
                        )
                    )
            training_seconds += time.perf_counter() - tick
            test_loss, test_accuracy = evaluate(model, bundle.test, device)
            record = recorder.end_epoch(test_loss=test_loss, test_accuracy=test_accuracy)
            monitored = record.train_loss
            if bundle.validation is not None:
                monitored += evaluate(model, bundle.validation, device)[0]
            schedule.after_epoch(monitored)
    store_bytes = sum(f.stat().st_size for f in Path(config.out).rglob("*") if f.is_file())
    return RecordSummary(
        path=Path(config.out),
        epochs=tuple(recorder.epochs),
        n_train=n_train,
        n_tracked=int(run.tracked.size),
        n_params=recorder.layout.n_params,
        seconds=time.perf_counter() - started,
        training_seconds=training_seconds,
        samples_per_second=n_train * config.epochs / max(training_seconds, 1e-9),
        store_bytes=store_bytes,
    )
