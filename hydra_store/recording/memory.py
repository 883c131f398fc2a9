"""The memory budget of a recording, worked out before anything is allocated or written.

The tracked state (rows x width x itemsize, twice with momentum, once per recurrence) is what
grows with the number of tracked samples. When it fits the budget it lives in memory for the
whole run; when it does not, the tracked rows are split into partitions that each fit, and the
partitions are recorded one after another (or side by side, one per worker) from the stored
per-step weights (hydra_store.recording.partitions). A request that cannot fit even so (one
row larger than the budget, or a store larger than the free disk) is refused with one line that
says what would fit.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra_store.errors import InvalidArgumentError
from hydra_store.resources import available_memory_bytes as available_memory_bytes

# Share of the memory available at the start that the tracked state may take by default: the
# rest is for the data set, the model, per-sample gradient buffers and the store writer's chunks.
STATE_MEMORY_SHARE = 0.8


def parse_size(text: str, option: str = "--memory-budget") -> int:
    """'4GiB', '500MB', '2e9' -> bytes (dask's parser: kB/MB/GB are powers of 1000, KiB/MiB/GiB
    of 1024)."""
    from dask.utils import parse_bytes

    try:
        size = int(parse_bytes(text))
    except (ValueError, TypeError, OverflowError) as error:
        raise InvalidArgumentError(
            f"{option} {text!r} is not a size; write it like 4GiB, 500MB or 2e9"
        ) from error
    if size <= 0:
        raise InvalidArgumentError(f"{option} must be a positive size, got {text!r}")
    return size


def format_size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def default_memory_budget(available: int | None) -> int | None:
    """STATE_MEMORY_SHARE of the available memory (None when that is unknown: no bound)."""
    return None if available is None else int(available * STATE_MEMORY_SHARE)


@dataclass(frozen=True)
class StatePlan:
    """Where the tracked state lives: how many rows each partition holds, and how many
    partitions there are (one: the whole state in memory during training)."""

    n_rows: int
    bytes_per_row: int
    budget: int | None
    budget_is_default: bool
    workers: int
    rows_per_partition: int

    @property
    def n_partitions(self) -> int:
        return -(-self.n_rows // self.rows_per_partition)

    @property
    def partitioned(self) -> bool:
        return self.n_partitions > 1

    @property
    def state_bytes(self) -> int:
        return self.n_rows * self.bytes_per_row

    def ranges(self) -> list[tuple[int, int]]:
        step = self.rows_per_partition
        return [(a, min(self.n_rows, a + step)) for a in range(0, self.n_rows, step)]

    def describe(self) -> str:
        """One line for the start of a recording."""
        budget = (
            "no memory bound (available memory unknown)"
            if self.budget is None
            else f"memory budget {format_size(self.budget)}"
            + (
                f" ({STATE_MEMORY_SHARE:.0%} of the memory available)"
                if self.budget_is_default
                else ""
            )
        )
        state = f"tracked state {format_size(self.state_bytes)} for {self.n_rows} samples"
        if not self.partitioned:
            return f"{budget}; {state}, in memory"
        return (
            f"{budget}; {state}: {self.n_partitions} partitions of up to "
            f"{self.rows_per_partition} samples, {self.workers} at a time, recorded from the "
            "stored per-step weights after training"
        )


def plan_state(
    n_rows: int,
    bytes_per_row: int,
    *,
    budget: int | None,
    budget_is_default: bool = False,
    workers: int = 1,
    chunk_rows: int | None = None,
    available: int | None = None,
) -> StatePlan:
    """Split `n_rows` rows of `bytes_per_row` into partitions whose state fits `budget` with
    `workers` partitions in memory at once (rounded down to whole store chunks of `chunk_rows`
    rows where a partition holds at least one). Refuses a budget larger than the `available`
    memory and a budget too small for one row."""
    if workers < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, got {workers}")
    if budget is not None and available is not None and budget > available:
        raise InvalidArgumentError(
            f"--memory-budget {format_size(budget)} is more than the {format_size(available)} "
            f"of memory available; give at most {format_size(available * STATE_MEMORY_SHARE)}"
        )
    if budget is None or bytes_per_row <= 0 or n_rows * bytes_per_row <= budget:
        return StatePlan(n_rows, bytes_per_row, budget, budget_is_default, 1, n_rows)
    fits = budget // workers // bytes_per_row
    if fits < 1:
        raise InvalidArgumentError(
            f"one tracked sample's state needs {format_size(bytes_per_row)}, more than the "
            f"memory budget of {format_size(budget)} shared by {workers} worker(s); give "
            f"--memory-budget at least {format_size(bytes_per_row * workers)}, or record a "
            "projection (--project-dim)"
        )
    if chunk_rows is not None and fits >= chunk_rows:
        fits = fits // chunk_rows * chunk_rows
    return StatePlan(n_rows, bytes_per_row, budget, budget_is_default, workers, min(fits, n_rows))


def check_state_fits(n_rows: int, bytes_per_row: int, available: int | None) -> None:
    """Refuse a state of `n_rows` x `bytes_per_row` that exceeds STATE_MEMORY_SHARE of the
    available memory (no check when that is unknown); for a state backend of the caller's own,
    which the recorder cannot partition."""
    if available is None or bytes_per_row <= 0:
        return
    allowed = int(available * STATE_MEMORY_SHARE)
    needed = n_rows * bytes_per_row
    if needed <= allowed:
        return
    fits = allowed // bytes_per_row
    raise InvalidArgumentError(
        f"the tracked state needs {format_size(needed)} in memory but "
        f"{format_size(available)} is available ({STATE_MEMORY_SHARE:.0%} of it may be used): "
        f"at most {fits} of the {n_rows} samples fit; track fewer (--track {max(1, fits)}), or "
        "record --trajectory-only and analyse with `analyze --method hydra-exact`, which needs "
        "no stored hypergradients"
    )


def check_disk_fits(path: str | Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, a store that would not fit the free disk space."""
    folder = Path(path).resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if needed > free:
        raise InvalidArgumentError(
            f"{what} needs about {format_size(needed)} on disk but {folder} has "
            f"{format_size(free)} free; free some space, track fewer samples (--track) or "
            "record a projection (--project-dim)"
        )
