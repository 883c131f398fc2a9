"""`hydra-store record --resume STORE`: finish a recording that was killed or failed.

- Stopped during training, or while writing its hypergradients at the end: the built-in run is
  built again from the store's configuration and goes on from the store's last durable point
  (recording/durable.py): the store is cut back to that point, model, optimizer, tracked state,
  data order and learning-rate schedule are put back as they were there, and training goes on
  to the end. The result equals the uninterrupted run's (tests/recording/test_durable.py).
- Stopped before its first durable point: recorded again from the start, with the stored
  configuration and tracked samples (which is what resuming from the start is).
- Stopped while its partitions were recorded after training (a state larger than its memory
  budget): the partitions not marked done are recorded, and the store is marked complete.
- A store written by a user's own training loop is refused with one line: its loop is the
  user's, not the CLI's to run again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hydra_store.arguments import RecordConfig
from hydra_store.data.training_data import dataset_attrs
from hydra_store.errors import InvalidArgumentError, StoreLockedError
from hydra_store.recording.partitions import pending_partitions, run_partitions
from hydra_store.recording.training import (
    PreparedRun,
    Progress,
    RecordSummary,
    prepare_run,
    record_run,
)
from hydra_store.store.durable import drop_durable_points, read_durable_point
from hydra_store.store.format import STATUS_COMPLETE, consolidate, now_iso, open_group
from hydra_store.store.location import StorePath, remove_tree, store_path
from hydra_store.store.locks import hold, live_holder, store_lock_file

OWN_LOOP_SOURCE = "user training loop"


@dataclass(frozen=True)
class ResumeSummary:
    """What `resume_recording` did: `how` is "durable point" (from_step, from_epoch say where
    training went on), "start" (no durable point: recorded again) or "partitions"."""

    path: StorePath
    how: str
    from_step: int | None = None
    from_epoch: int | None = None
    partitions: int = 0
    record: RecordSummary | None = None


def resume_recording(
    path: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    partition_progress: Callable[[str, int, int], None] | None = None,
) -> ResumeSummary:
    """Finish the stopped recording at `path` (see the module's docstring). `scheduler` and
    `workers` set where the partitions after training run (default: as recorded; the number of
    partitions itself is the recording's)."""
    group = open_group(path)
    if group.attrs.get("status") == STATUS_COMPLETE:
        raise InvalidArgumentError(f"{path} is complete; there is nothing to resume")
    holder = live_holder(store_lock_file(store_path(path)))
    if holder is not None:
        raise StoreLockedError(
            f"the store {path} is being written by {holder.describe()}; it is not stopped"
        )
    if "partition_done" in group:
        return _finish_partitions(path, scheduler, workers, partition_progress)
    config = _stored_config(group, path, scheduler)
    tracked = np.asarray(group["sample"][...], dtype=np.int64)
    point = read_durable_point(group)
    if point is None:
        prepared = _prepare(config, tracked, group, path)
        with hold(store_lock_file(store_path(path)), f"the store {path}"):
            remove_tree(store_path(path))
        summary = record_run(
            config, prepared=prepared, progress=progress, partition_progress=partition_progress
        )
        return ResumeSummary(summary.path, "start", record=summary)
    partitions = group.attrs.get("partitions")
    if isinstance(partitions, dict):
        # The partition plan is the recording's, not one worked out from today's free memory.
        config = dataclasses.replace(
            config,
            memory_budget=str(int(partitions["memory_budget"])),
            workers=int(partitions["workers"]),
        )
    prepared = _prepare(config, tracked, group, path)
    summary = record_run(
        config,
        prepared=prepared,
        progress=progress,
        partition_progress=partition_progress,
        resume=True,
    )
    return ResumeSummary(
        summary.path,
        "durable point",
        from_step=summary.resumed_from_step,
        from_epoch=int(point["epoch"]),
        record=summary,
    )


def _stored_config(group, path, scheduler: str | None) -> RecordConfig:
    """The run's configuration, as stored; refused for a user's own loop's store."""
    config = group.attrs.get("config")
    if not isinstance(config, dict) or "sample" not in group:
        raise InvalidArgumentError(
            f"{path} was stopped before its configuration was written; record it again"
        )
    if config.get("source") == OWN_LOOP_SOURCE or not {"dataset", "model"} <= set(config):
        raise InvalidArgumentError(
            f"{path} was recorded by a training loop of your own, which `record --resume` "
            "cannot run again; record it again from your loop"
        )
    stored = RecordConfig.from_attrs(config)
    return dataclasses.replace(stored, out=str(path), scheduler=scheduler or stored.scheduler)


def _prepare(config: RecordConfig, tracked: np.ndarray, group, path) -> PreparedRun:
    """The run's data and model, built again; refused if the data are not the recorded ones."""
    prepared = prepare_run(config, tracked=tracked, new_store=False)
    stored = group.attrs.get("dataset")
    if stored != dataset_attrs(prepared.bundle, prepared.train_labels):
        raise InvalidArgumentError(
            f"the data set {config.dataset!r} loaded now differs from the one {path} was "
            "recorded with (its fingerprints or sizes changed), so the recording cannot be "
            "continued; record it again"
        )
    return prepared


def _finish_partitions(
    path: str | os.PathLike[str],
    scheduler: str | None,
    workers: int | None,
    progress: Callable[[str, int, int], None] | None,
) -> ResumeSummary:
    """Record the partitions a recording stopped after training left undone, and mark it
    complete."""
    with hold(store_lock_file(store_path(path)), f"the store {path}"):
        group = open_group(path)
        if group.attrs.get("status") == STATUS_COMPLETE:
            raise InvalidArgumentError(f"{path} is complete; there is nothing to resume")
        pending = pending_partitions(group)
        if workers is None:
            workers = int((group.attrs.get("partitions") or {}).get("workers", 1))
        if scheduler is None:
            scheduler = (group.attrs.get("config") or {}).get("scheduler", "threads")
        if pending:
            run_partitions(path, None, scheduler=scheduler, workers=workers, progress=progress)
        writable = open_group(path, mode="r+")
        if "failure" in writable.attrs:
            del writable.attrs["failure"]
        writable.attrs.update({"status": STATUS_COMPLETE, "completed": now_iso()})
        drop_durable_points(writable)
        consolidate(path)
        return ResumeSummary(store_path(path), "partitions", partitions=len(pending))
