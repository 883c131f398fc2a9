"""What this machine has: the memory available now. Used to refuse, before allocating, work
that cannot fit (a tracked state, a generated data set)."""

from __future__ import annotations

import os


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


def device_free_memory_bytes(device) -> int | None:
    """Free memory of a CUDA device (`torch.cuda.mem_get_info`); None for any other device."""
    if getattr(device, "type", None) != "cuda":
        return None
    import torch

    return int(torch.cuda.mem_get_info(device)[0])
