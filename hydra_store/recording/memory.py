"""The memory check before the tracked state is allocated: a recording whose in-memory state
cannot fit is refused with one line that says what would fit, instead of being killed by the
kernel's out-of-memory killer part-way through."""

from __future__ import annotations

import os

from hydra_store.errors import InvalidArgumentError

# Share of the memory available at the start that the tracked state may take: the rest is for
# the data set, the model, per-sample gradient buffers and the store writer's chunks.
STATE_MEMORY_SHARE = 0.8


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else the free physical pages; None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_state_fits(n_rows: int, bytes_per_row: int, available: int | None) -> None:
    """Refuse a state of `n_rows` x `bytes_per_row` that exceeds STATE_MEMORY_SHARE of the
    available memory (no check when that is unknown)."""
    if available is None or bytes_per_row <= 0:
        return
    allowed = int(available * STATE_MEMORY_SHARE)
    needed = n_rows * bytes_per_row
    if needed <= allowed:
        return
    fits = allowed // bytes_per_row
    raise InvalidArgumentError(
        f"the tracked state needs {_size(needed)} in memory but {_size(available)} is available ({STATE_MEMORY_SHARE:.0%} of it may be used): "
        f"at most {fits} of the {n_rows} samples fit; track fewer (--track {max(1, fits)}), or "
        "record --trajectory-only and analyse with `analyze --method hydra-exact`, which needs "
        "no stored hypergradients"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
