"""`hydra-store verify`: every chunk read and checked (store.integrity), the recording's
parts counted against what its attributes say it holds, and the trajectory replayed against
the stored checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from hydra_store.errors import HydraStoreError, StoreFormatError
from hydra_store.replay.trajectory import replay_training
from hydra_store.store.format import STATUS_COMPLETE, check_root_attributes, open_group
from hydra_store.store.integrity import VerifyReport, checked_reads, verify_store

Progress = Callable[[str, int, int], None]


def verify_recording(
    path: str | os.PathLike[str], *, replay: bool = True, progress: Progress | None = None
) -> VerifyReport:
    """Check a store end to end; the report's `faults` list every problem found (empty: the
    store is intact and consistent)."""
    group = open_group(path)
    report = verify_store(path, group, None if progress is None else _stage(progress, "chunks"))
    attrs = dict(group.attrs)
    if attrs.get("status") != STATUS_COMPLETE:
        report.faults.append(
            f"status {attrs.get('status')!r}: the recording did not finish"
            + (f" ({attrs['failure']})" if attrs.get("failure") else "")
        )
    try:
        check_root_attributes(group, path)
    except StoreFormatError as error:
        report.faults.append(str(error))
        report.skipped.append("the counts and the replay (malformed attributes)")
        return report
    report.faults.extend(_count_faults(group, attrs))
    config = attrs.get("config") or {}
    if not replay:
        report.skipped.append("the replay (--no-replay)")
    elif report.faults:
        report.skipped.append("the replay (the store has faults already)")
    elif not {"dataset", "model"} <= set(config):
        report.skipped.append("the replay (the store names no data set and model to rebuild)")
    else:
        report.faults.extend(_replay_faults(path, progress))
    return report


def _stage(progress: Progress, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: progress(stage, done, total)


def _count_faults(group, attrs: dict) -> list[str]:
    """The recorded parts against the counts the attributes promise."""
    faults = []
    arrays = dict(group.arrays())
    steps = int(attrs.get("recorded_step", 0))
    for name in ("lr", "momentum", "batch_index", "batch_loss", "step_epoch"):
        if name in arrays and arrays[name].shape[0] != steps:
            faults.append(f"{name} has {arrays[name].shape[0]} steps; the store recorded {steps}")
    if "checkpoint_step" in arrays:
        checkpoint_step = np.asarray(arrays["checkpoint_step"][:])
        if checkpoint_step.size == 0 or int(checkpoint_step[-1]) != steps:
            last = int(checkpoint_step[-1]) if checkpoint_step.size else None
            faults.append(f"the last checkpoint is at step {last}; the store recorded {steps}")
        for name in ("weights", "velocity", "checkpoint_epoch"):
            if name in arrays and arrays[name].shape[0] != checkpoint_step.size:
                faults.append(
                    f"{name} has {arrays[name].shape[0]} checkpoints; checkpoint_step has "
                    f"{checkpoint_step.size}"
                )
    n_tracked = attrs.get("n_tracked")
    for name in ("hypergradient", "hypergradient_exact", "sample", "label"):
        if name in arrays and n_tracked is not None and arrays[name].shape[0] != n_tracked:
            faults.append(f"{name} has {arrays[name].shape[0]} rows; {n_tracked} were tracked")
    if "partition_done" in arrays:
        done = np.asarray(arrays["partition_done"][:])
        if not done.all():
            faults.append(f"{int((~done).sum())} of {done.size} partitions were not recorded")
    return faults


def _replay_faults(path: str | os.PathLike[str], progress: Progress | None) -> list[str]:
    """Replay the training from the initial weights; a segment that misses its checkpoint is a
    fault (a store from a user's loop that names no data set cannot be replayed here)."""
    try:
        with checked_reads(str(path)):
            replay_training(path, check=True)
    except HydraStoreError as error:
        return [f"replay: {error}"]
    if progress is not None:
        progress("replay", 1, 1)
    return []
