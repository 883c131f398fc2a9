"""A readable description of a store, for `hydra-store info`."""

from __future__ import annotations

from os import PathLike

import numpy as np

from hydra_store.errors import StoreFormatError
from hydra_store.store.durable import read_durable_point
from hydra_store.store.format import STATUS_COMPLETE, STATUS_RECORDING, open_group
from hydra_store.store.location import store_path
from hydra_store.store.locks import live_holder, store_lock_file


def describe_store(path: str | PathLike[str]) -> list[str]:
    """Lines describing a store: status, run configuration, sizes, training metrics, analyses."""
    group = open_group(path)
    try:
        return _describe(path, group)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise StoreFormatError(
            f"{path} has malformed root attributes ({type(error).__name__}: {error}); the store "
            "is damaged. `hydra-store verify` checks it"
        ) from None


def _describe(path: str | PathLike[str], group) -> list[str]:
    attrs = dict(group.attrs)
    config = attrs.get("config") or {}
    dataset = attrs.get("dataset") or {}
    liveness = _liveness(path, attrs.get("status"))
    lines = [
        f"store {path}",
        f"  format {attrs['hydra_store_format']}, status {attrs.get('status')}" + liveness,
    ]
    if attrs.get("status") == "failed" and attrs.get("failure"):
        lines.append(f"  failure: {attrs['failure']}")
    if attrs.get("status") != STATUS_COMPLETE and " (live:" not in liveness:
        lines.append(_resume_line(group, attrs, config))
    lines.append(
        f"  recorded {attrs.get('created', '?')} .. {attrs.get('completed', 'not completed')}, "
        f"{attrs.get('recorded_step', 0)} steps"
    )
    if config:
        lines.append(
            f"  data {config.get('dataset')}  model {config.get('model')}  seed {config.get('seed')}"
        )
        lines.append(
            f"  SGD lr {config.get('lr')} momentum {config.get('momentum')} weight decay "
            f"{config.get('weight_decay')} batch {config.get('batch_size')} schedule "
            f"{config.get('schedule')} epochs {config.get('epochs')}"
        )
        if config.get("label_noise"):
            lines.append(f"  label noise {config['label_noise']:.0%} of training labels")
    if attrs.get("mode") == "trajectory":
        lines.append(
            f"  mode trajectory: no hypergradients ({attrs.get('n_train')} training samples, "
            f"{attrs.get('n_params'):,} parameters); analyse with `analyze --method hydra-exact`"
        )
    else:
        lines.append(
            f"  mode {attrs.get('mode')}: {attrs.get('n_tracked')} of {attrs.get('n_train')} "
            f"training samples tracked, {attrs.get('n_params'):,} parameters"
        )
    if dataset:
        lines.append(
            f"  splits: {dataset.get('n_train')} train, {dataset.get('n_validation', 0)} "
            f"validation, {dataset.get('n_test')} test; classes {', '.join(dataset['class_names'])}"
        )
    arrays = dict(group.arrays())
    if "checkpoint_step" in arrays:
        lines.append(f"  checkpoints: {arrays['checkpoint_step'].shape[0]}")
    projection = attrs.get("projection")
    if projection:
        lines.append(
            f"  projection {projection.get('kind')}: {projection.get('width')} dimensions"
            + (f", seed {projection['seed']}" if "seed" in projection else "")
        )
    partitions = attrs.get("partitions")
    if partitions:
        lines.append(_partition_line(partitions, arrays, int(attrs.get("n_tracked", 0))))
    for name in ("hypergradient", "hypergradient_exact"):
        if name in arrays:
            a = arrays[name]
            lines.append(f"  {name}: {a.shape[0]} x {a.shape[1]} {a.dtype}, chunks {a.chunks}")
    if "test_accuracy" in arrays and arrays["test_accuracy"].shape[0]:
        acc = np.asarray(arrays["test_accuracy"][:])
        loss = np.asarray(arrays["train_loss"][:])
        lines.append(
            f"  epochs {acc.size}: final train loss {loss[-1]:.4f}, test accuracy "
            f"{100 * acc[-1]:.2f}% (best {100 * np.nanmax(acc):.2f}%)"
        )
    for parent in ("analysis", "reverse"):
        if parent in dict(group.groups()):
            names = sorted(dict(group[parent].groups()))
            names = [n for n in names if not n.startswith(".")]
            if names:
                lines.append(f"  {parent}: {', '.join(names)}")
    return lines


def _resume_line(group, attrs: dict, config: dict) -> str:
    """For a stopped store: what `record --resume` would do with it."""
    if "partition_done" in group:
        return "  resume: `hydra-store record --resume` records the partitions not done"
    if config.get("source") == "user training loop" or not {"dataset", "model"} <= set(config):
        return (
            "  resume: not by `hydra-store record --resume` (a training loop of your own, or no "
            "configuration stored): record it again"
        )
    point = read_durable_point(group)
    if point is None:
        return (
            "  resume: no durable point yet; `hydra-store record --resume` records it again "
            "from the start"
        )
    where = f"the end of epoch {point['epoch']}"
    if point.get("step_in_epoch"):
        where = f"step {point['step_in_epoch']} of epoch {point['epoch'] + 1}"
    return (
        f"  resume: `hydra-store record --resume` continues from its durable point at step "
        f"{point['step']} ({where}; written {point.get('written', '?')})"
    )


def _liveness(path: str | PathLike[str], status: str | None) -> str:
    """For a store still `recording`: whether a live process is writing it, or it was killed."""
    if status != STATUS_RECORDING:
        return ""
    lock = store_lock_file(store_path(path))
    if lock is None:
        return ""
    holder = live_holder(lock)
    if holder is not None:
        return f" (live: {holder.describe()})"
    return " (no process is writing it: the recording was killed or crashed)"


def _partition_line(partitions: dict, arrays: dict, n_rows: int) -> str:
    """How the state was split under the memory budget, and how many rows are in the store."""
    rows, count = int(partitions["rows"]), int(partitions["count"])
    line = (
        f"  partitions: {count} of up to {rows} samples (memory budget "
        f"{partitions.get('memory_budget', 0) / 2**20:,.1f} MiB)"
    )
    if "partition_done" not in arrays:
        return line + "; not started (training)"
    done = np.asarray(arrays["partition_done"][:])
    written = rows_written(done, rows, n_rows)
    return line + f"; {int(done.sum())} done, {written} of {n_rows} rows written"


def rows_written(done: np.ndarray, rows_per_partition: int, n_rows: int) -> int:
    """Tracked rows in the store of a partitioned recording: those of the partitions done."""
    starts = np.nonzero(done)[0] * rows_per_partition
    return int(np.sum(np.minimum(n_rows, starts + rows_per_partition) - starts))
