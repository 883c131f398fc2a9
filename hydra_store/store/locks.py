"""One writer at a time.

A recording holds a lock beside its store (`.<store name>.lock` in the same folder: it must
outlive the deletion of an old store under `--overwrite`); an analysis holds one on the group it
replaces (`<store>/analysis/.test.lock`). A lock file is created exclusively (`O_EXCL`) and
names its holder: process id, its start time, host and command. A second writer is refused with
one line naming the holder. A lock whose holder is gone (same host, and no process with that id
and start time) is stale: it is taken over.

On object storage (a store at an fsspec URL) the lock is an object beside the store, created
with a conditional write that fails if it exists (S3's `If-None-Match: *`, which s3fs issues
for mode "xb"), so the same protocol holds there. A holder on another host cannot be checked:
its lock stays until it ends or someone deletes it (the refusal says which object).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from upath import UPath

from hydra_store.errors import StoreLockedError
from hydra_store.store.location import StorePath, store_path

LockPath = Path | UPath


@dataclass(frozen=True)
class LockHolder:
    pid: int
    started: float | None  # the process's start time (clock ticks since boot), against pid reuse
    host: str
    command: str
    since: str

    def describe(self) -> str:
        return f"`{self.command}` (pid {self.pid} on {self.host}, since {self.since})"

    def is_me(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """False only when the holder is certainly gone: same host, and no process with its id
        (or one with its id but another start time)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return self.started is None or _process_start(self.pid) in (None, self.started)


def _process_start(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return float(fields[19])  # field 22 of stat: starttime


def _me() -> LockHolder:
    return LockHolder(
        pid=os.getpid(),
        started=_process_start(os.getpid()),
        host=socket.gethostname(),
        command=_command(),
        since=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def _command() -> str:
    """`hydra-store record` for the CLI; the script's name for a Python program."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "hydra-store" and len(sys.argv) > 1:
        return f"hydra-store {sys.argv[1]}"
    return program


def store_lock_file(store: StorePath) -> LockPath:
    """The recording lock of a store: beside it, in its folder or under its prefix's parent."""
    return store.parent / f".{store.name}.lock"


def group_lock_file(store: StorePath, name: str) -> LockPath:
    """The lock of the result group `name` (e.g. `analysis/test`) of a store."""
    *parents, last = name.split("/")
    return store.joinpath(*parents) / f".{last}.lock"


def _fresh(lock: LockPath) -> LockPath:
    """An object-store path with the file system's listing cache dropped (another process may
    have created or deleted the lock since it was listed)."""
    if isinstance(lock, UPath):
        lock.fs.invalidate_cache(lock.path)
    return lock


def read_holder(lock: LockPath) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(_fresh(lock).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def live_holder(lock: LockPath | None) -> LockHolder | None:
    """Who holds `lock` now (None: nobody, or only a stale holder)."""
    if lock is None or not _fresh(lock).exists():
        return None
    holder = read_holder(lock)
    return holder if holder is not None and holder.is_alive() else None


def live_holders_inside(store: StorePath) -> list[LockHolder]:
    """The live holders of any group lock inside a store (analyses writing into it)."""
    if not _fresh(store).is_dir():
        return []
    holders = (live_holder(lock) for lock in store.rglob(".*.lock"))
    return [holder for holder in holders if holder is not None]


# A lock file that cannot be read is taken for a stale one only when it is at least this old
# (seconds): a lock is published whole (`_publish`), so an unreadable one was damaged.
UNREADABLE_LOCK_AGE = 10.0


def _publish(lock: LockPath, holder: LockHolder) -> bool:
    """Create `lock` holding `holder`, atomically and only if it does not exist: the holder is
    written to a private file first and hard-linked into place, so no reader ever sees a lock
    file without its holder (an empty one would look stale and be taken over). On object
    storage, one conditional write of the whole object does both."""
    if isinstance(lock, UPath):
        try:
            with lock.fs.open(lock.path, "xb") as file:
                file.write(json.dumps(asdict(holder)).encode())
        except FileExistsError:
            return False
        finally:
            lock.fs.invalidate_cache(lock.path)
        return True
    private = lock.with_name(f"{lock.name}.{os.getpid()}-{time.monotonic_ns()}")
    private.write_text(json.dumps(asdict(holder)))
    try:
        os.link(private, lock)
        return True
    except FileExistsError:
        return False
    finally:
        private.unlink(missing_ok=True)


def _is_stale(lock: LockPath, holder: LockHolder | None) -> bool:
    if holder is not None:
        return not holder.is_alive()
    try:
        return time.time() - _fresh(lock).stat().st_mtime >= UNREADABLE_LOCK_AGE
    except FileNotFoundError:
        return True
    except (OSError, AttributeError, TypeError, ValueError):
        return False  # an object store that gives no age: left to the user to delete


@contextlib.contextmanager
def hold(lock: LockPath | None, what: str) -> Iterator[None]:
    """Hold `lock` for the block; refuse (StoreLockedError) while a live process holds it."""
    if lock is None:
        yield
        return
    me = _me()
    for _ in range(5):
        if _publish(lock, me):
            break
        holder = read_holder(lock)
        if not _is_stale(lock, holder):
            who = holder.describe() if holder is not None else "another process"
            raise StoreLockedError(
                f"{what} is being written by {who}; wait for it to finish "
                f"(or, if that process is gone, delete {lock})"
            )
        # Take over a stale lock only if it is still the one judged stale (another process may
        # have taken it over meanwhile).
        if read_holder(lock) == holder:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
    else:
        raise StoreLockedError(f"could not take the lock {lock} for {what}; try again")
    try:
        yield
    finally:
        if read_holder(lock) == me:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def check_not_written(path: str | os.PathLike[str]) -> None:
    """Refuse to replace or delete a store that a live process is recording or analysing."""
    store = store_path(path)
    holders = [live_holder(store_lock_file(store)), *live_holders_inside(store)]
    holders = [h for h in holders if h is not None and not h.is_me()]
    if holders:
        raise StoreLockedError(
            f"{store} is being written by {holders[0].describe()}; refusing to replace it. "
            "Wait for that run to finish, or choose another --out"
        )
