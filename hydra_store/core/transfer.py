"""Rows leaving the device for the store without holding the device up.

`to_host(rows)` snapshots a block of rows and returns at once. On a GPU the snapshot is a device
copy on the compute stream (so later kernels may change the rows), copied to a pinned host buffer
on a copy stream of its own: the copy overlaps the kernels the caller queues next, and the
store writer's thread waits for it alone (`HostRows.numpy()`). On the CPU it is a copy of the
rows in the store's dtype (the caller may go on changing the rows: a checkpoint's hypergradients
are written while training continues).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

K = TypeVar("K")


class HostRows:
    """A block of rows on its way to host memory."""

    def __init__(self, rows: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        self._rows = rows
        self._done = done

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._rows.shape)

    def numpy(self) -> np.ndarray:
        """The rows as a numpy array (waiting for their copy to finish)."""
        if self._done is not None:
            self._done.synchronize()
            self._done = None
        return self._rows.numpy()

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self.numpy()
        return rows if dtype is None else rows.astype(dtype, copy=False)


class DeviceToHost:
    """Snapshots of device rows copied to pinned host memory on one copy stream."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def to_host(
        self, rows: torch.Tensor, dtype: torch.dtype = torch.float32, *, snapshot: bool = True
    ) -> HostRows:
        """A snapshot of `rows` in `dtype`, on its way to host memory. `snapshot=False`: the
        caller leaves the rows alone until it has read them back, so rows already in host
        memory (in `dtype`) are not copied."""
        rows = rows.detach()
        if self._copy_stream is None or rows.device.type != "cuda":
            return HostRows(rows.to("cpu", dtype, copy=snapshot))
        snapshot = rows.to(dtype, copy=True)
        compute = torch.cuda.current_stream(self.device)
        copy = self._copy_stream
        copy.wait_stream(compute)
        host = torch.empty(snapshot.shape, dtype=dtype, pin_memory=True)
        with torch.cuda.stream(copy):
            host.copy_(snapshot, non_blocking=True)
            snapshot.record_stream(copy)
            done = torch.cuda.Event()
            done.record(copy)
        return HostRows(host, done)


def one_block_ahead(blocks: Iterable[tuple[K, HostRows]]) -> Iterator[tuple[K, np.ndarray]]:
    """`(key, rows)` pairs as `(key, numpy array)`, one behind: block k + 1 is taken from
    `blocks` (its copy queued) before block k is waited for, so that a caller writing block k
    overlaps the copy of the next one."""
    queued: tuple[K, HostRows] | None = None
    for key, rows in blocks:
        if queued is not None:
            yield queued[0], queued[1].numpy()
        queued = (key, rows)
    if queued is not None:
        yield queued[0], queued[1].numpy()
