"""`hydra-store record --resume STORE`: finish a recording that was killed or failed.

What can be resumed today is the phase after training of a partitioned recording (a state
larger than its memory budget): its partitions are independent and each is marked done in the
store once written (`partition_done`), so the partitions not done are recorded, and the store
is marked complete. Its result equals the uninterrupted run's (the partitions run the same code
on the same stored steps). A recording stopped during training is not resumable yet: its
tracked state exists only in memory until the end, and is refused with one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from hydra_store.errors import InvalidArgumentError
from hydra_store.recording.partitions import pending_partitions, run_partitions
from hydra_store.store.format import STATUS_COMPLETE, consolidate, now_iso, open_group
from hydra_store.store.location import store_path
from hydra_store.store.locks import hold, store_lock_file


def resume_recording(
    path: str | os.PathLike[str],
    *,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> int:
    """Record the partitions a stopped recording left undone and mark it complete; returns how
    many partitions were recorded."""
    with hold(store_lock_file(store_path(path)), f"the store {path}"):
        group = open_group(path)
        status = group.attrs.get("status")
        if status == STATUS_COMPLETE:
            raise InvalidArgumentError(f"{path} is complete; there is nothing to resume")
        if "partition_done" not in group:
            raise InvalidArgumentError(
                f"{path} was stopped during training (step {group.attrs.get('recorded_step', 0)}"
                "), and only the partitions recorded after training can be resumed so far; "
                "record it again"
            )
        pending = pending_partitions(group)
        if workers is None:
            workers = int((group.attrs.get("partitions") or {}).get("workers", 1))
        if pending:
            run_partitions(path, None, scheduler=scheduler, workers=workers, progress=progress)
        writable = open_group(path, mode="r+")
        if "failure" in writable.attrs:
            del writable.attrs["failure"]
        writable.attrs.update({"status": STATUS_COMPLETE, "completed": now_iso()})
        consolidate(path)
        return len(pending)
