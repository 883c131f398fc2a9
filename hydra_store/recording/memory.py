"""The memory budget of a recording, worked out before anything is allocated or written.

The tracked state (rows x width x itemsize, twice with momentum, once per recurrence) is what
grows with the number of tracked samples. When it fits the budget it lives in memory for the
whole run; when it does not, the tracked rows are split into partitions that each fit, and the
partitions are recorded one after another (or side by side, one per worker) from the stored
per-step weights (hydra_store.recording.partitions). A request that cannot fit even so (one
row larger than the budget, or a store larger than the free disk) is refused with one line that
says what would fit.

On a GPU there is a second budget, the GPU's (`device_budget`: by default DEVICE_STATE_SHARE of
its free memory). A state within both lives in GPU memory. One within the host's budget but not
the GPU's is kept in host memory while the GPU computes (`location == "host"`,
hydra_store.core.host_staged_state), where the recurrence touches only the batch's rows (the
approximate one); otherwise (the exact recurrence, or a state over the host's budget) it is
recorded in partitions that fit both budgets.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from hydra_store.errors import InvalidArgumentError
from hydra_store.resources import available_memory_bytes as available_memory_bytes

# Share of the memory available at the start that the tracked state may take by default: the
# rest is for the data set, the model, per-sample gradient buffers and the store writer's chunks.
STATE_MEMORY_SHARE = 0.8

# Share of a GPU's free memory at the start that the tracked state may take by default: the rest
# is for the model, activations, a batch's per-sample gradients and the staging of rows.
DEVICE_STATE_SHARE = 0.7


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


def default_device_budget(free: int | None) -> int | None:
    """DEVICE_STATE_SHARE of a GPU's free memory (None for the CPU: no second budget)."""
    return None if free is None else int(free * DEVICE_STATE_SHARE)


@dataclass(frozen=True)
class StatePlan:
    """Where the tracked state lives: how many rows each partition holds, and how many
    partitions there are (one: the whole state in memory during training); with one, whether
    it is in the model's device memory (`location` "device") or in host memory while a GPU
    computes ("host")."""

    n_rows: int
    bytes_per_row: int
    budget: int | None
    budget_is_default: bool
    workers: int
    rows_per_partition: int
    location: str = "device"
    device_budget: int | None = None

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
        if self.device_budget is not None:
            budget += f", GPU budget {format_size(self.device_budget)}"
        if not self.partitioned:
            if self.device_budget is None:
                return f"{budget}; {state}, in memory"
            if self.location == "host":
                return (
                    f"{budget}; {state}, in host memory: each step's batch rows are copied to "
                    "the GPU and back through pinned buffers"
                )
            return f"{budget}; {state}, in GPU memory"
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
    device_budget: int | None = None,
    host_staging: bool = False,
) -> StatePlan:
    """Split `n_rows` rows of `bytes_per_row` into partitions whose state fits `budget` with
    `workers` partitions in memory at once (rounded down to whole store chunks of `chunk_rows`
    rows where a partition holds at least one). Refuses a budget larger than the `available`
    memory and a budget too small for one row.

    `device_budget` (a GPU's): a state within `budget` but over it is kept in host memory when
    `host_staging` (the recurrence touches only the batch's rows), else recorded in partitions
    that fit it; a state over `budget` is recorded in partitions that fit both."""
    if workers < 1:
        raise InvalidArgumentError(f"--workers must be at least 1, got {workers}")
    if budget is not None and available is not None and budget > available:
        raise InvalidArgumentError(
            f"--memory-budget {format_size(budget)} is more than the {format_size(available)} "
            f"of memory available; give at most {format_size(available * STATE_MEMORY_SHARE)}"
        )
    whole = StatePlan(
        n_rows, bytes_per_row, budget, budget_is_default, 1, n_rows, "device", device_budget
    )
    state = n_rows * bytes_per_row
    if bytes_per_row <= 0 or (
        (budget is None or state <= budget) and (device_budget is None or state <= device_budget)
    ):
        return whole
    if (budget is None or state <= budget) and host_staging:
        return dataclasses.replace(whole, location="host")
    limits = [(b, name) for b, name in ((budget, "memory"), (device_budget, "GPU memory")) if b]
    limit, limit_name = min(limits)
    fits = limit // workers // bytes_per_row
    if fits < 1:
        option = "--memory-budget" if limit_name == "memory" else "--device-memory-budget"
        raise InvalidArgumentError(
            f"one tracked sample's state needs {format_size(bytes_per_row)}, more than the "
            f"{limit_name} budget of {format_size(limit)} shared by {workers} worker(s); give "
            f"{option} at least {format_size(bytes_per_row * workers)}, or record a "
            "projection (--project-dim)"
        )
    if chunk_rows is not None and fits >= chunk_rows:
        fits = fits // chunk_rows * chunk_rows
    return dataclasses.replace(whole, workers=workers, rows_per_partition=min(fits, n_rows))


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
