"""A tracked state kept in host memory while a GPU computes: for a state larger than the GPU's
free memory, recorded by the approximate recurrence.

The approximate recurrence touches only the rows of a step's batch (the lazy update), so the
state need not be on the GPU: each `update_rows` gathers those rows into a pinned staging
buffer, copies them to the GPU on a copy stream of its own, updates them there, and copies them
back on the copy stream. The host rows are written back at the start of the next call (or read,
or write), so the copy back overlaps whatever the caller queues next: the next step's forward
and backward passes. The copy to the GPU overlaps nothing in the recorder as it is: each step
reads the batch's rows and loss back to the host, which waits for the gradient kernels first. Only the staging buffers are pinned: torch's pinned allocator rounds an allocation up to
a power of two (a 20 GiB state would lock 32 GiB), and the rows of a step are gathered and
scattered by the CPU anyway.

On the CPU the same code runs with ordinary buffers and no streams (what the tests check; the
result equals `InMemoryTrackedState`'s). The exact recurrence touches every row every step, so
with this state every row crosses the bus twice a step: it works, but partitions
(hydra_store.recording.partitions) are the way to record it beyond GPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydra_store.core.state import TrackedState, affine_row_update, allocate_dense_state
from hydra_store.errors import InvalidArgumentError

# Bytes of one staging buffer (there are up to four: h and m, to and from the device); an
# update of more rows than fit is done a block at a time.
STAGING_BYTES = 256 * 2**20


@dataclass
class _PendingRows:
    """Rows updated on the device whose copy back to the host may still be running."""

    rows: torch.Tensor  # int64, on the CPU
    h: torch.Tensor  # (R, width) staging rows, host
    m: torch.Tensor | None
    done: torch.cuda.Event | None  # recorded on the copy stream after the copy back


class HostStagedTrackedState(TrackedState):
    """h (and m) in host memory; updates computed on `device` from staged copies of the rows."""

    def __init__(
        self,
        n_rows: int,
        width: int,
        *,
        has_momentum: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        staging_bytes: int = STAGING_BYTES,
    ) -> None:
        if staging_bytes <= 0:
            raise InvalidArgumentError(f"staging_bytes must be positive, got {staging_bytes}")
        self.h, self.m = allocate_dense_state(
            n_rows,
            width,
            has_momentum=has_momentum,
            dtype=dtype,
            device=torch.device("cpu"),
            remedy="track fewer samples (--track N) or give --memory-budget so that it is "
            "recorded in partitions",
        )
        self.n_rows, self.width = n_rows, width
        self.has_momentum = has_momentum
        self.dtype = dtype
        self.device = torch.device(device)
        self._on_gpu = self.device.type == "cuda"
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.block_rows = max(1, min(n_rows, staging_bytes // (width * itemsize)))
        self._staging: dict[str, torch.Tensor] = {}
        self._pending: _PendingRows | None = None
        self._copy_stream = torch.cuda.Stream(self.device) if self._on_gpu else None

    def _buffer(self, name: str, n: int) -> torch.Tensor:
        """The first n rows of staging buffer `name` (allocated, pinned on a GPU, at first use)."""
        if name not in self._staging:
            self._staging[name] = torch.empty(
                self.block_rows, self.width, dtype=self.dtype, pin_memory=self._on_gpu
            )
        return self._staging[name][:n]

    def settle(self) -> None:
        """Write the rows of the last update back into the host state (waiting for their copy)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.done is not None:
            pending.done.synchronize()
        self.h.index_copy_(0, pending.rows, pending.h)
        if self.m is not None:
            self.m.index_copy_(0, pending.rows, pending.m)

    def update_rows(
        self,
        rows: torch.Tensor,
        transition: torch.Tensor,
        injection: torch.Tensor | None = None,
        gradients: torch.Tensor | None = None,
    ) -> None:
        rows = rows.to("cpu", torch.int64)
        for a in range(0, rows.numel(), self.block_rows):
            b = min(rows.numel(), a + self.block_rows)
            self._update_block(
                rows[a:b],
                transition[a:b],
                None if injection is None else injection[a:b],
                None if gradients is None else gradients[a:b],
            )

    def _update_block(self, rows, transition, injection, gradients) -> None:
        self.settle()
        n = rows.numel()
        h_in = torch.index_select(self.h, 0, rows, out=self._buffer("h_in", n))
        m_in = (
            None
            if self.m is None
            else torch.index_select(self.m, 0, rows, out=self._buffer("m_in", n))
        )
        transition = transition.to(dtype=self.dtype)
        if injection is not None:
            injection = injection.to(dtype=self.dtype)
        if not self._on_gpu:
            h_new, m_new = affine_row_update(h_in, m_in, transition, injection, gradients)
            self._pending = _PendingRows(rows, h_new, m_new, None)
            return
        compute = torch.cuda.current_stream(self.device)
        copy = self._copy_stream
        # The staging buffers were last read by copies that `settle` waited for, so the copy
        # stream need not wait for anything before it fills the device rows.
        with torch.cuda.stream(copy):
            h_old = h_in.to(self.device, non_blocking=True)
            m_old = None if m_in is None else m_in.to(self.device, non_blocking=True)
            transition = transition.to(self.device, non_blocking=True)
            if injection is not None:
                injection = injection.to(self.device, non_blocking=True)
        compute.wait_stream(copy)
        for tensor in (h_old, m_old, transition, injection):
            if tensor is not None:
                tensor.record_stream(compute)
        h_new, m_new = affine_row_update(h_old, m_old, transition, injection, gradients)
        copy.wait_stream(compute)
        h_out = self._buffer("h_out", n)
        m_out = None if m_new is None else self._buffer("m_out", n)
        with torch.cuda.stream(copy):
            h_out.copy_(h_new, non_blocking=True)
            h_new.record_stream(copy)
            if m_new is not None:
                m_out.copy_(m_new, non_blocking=True)
                m_new.record_stream(copy)
            done = torch.cuda.Event()
            done.record(copy)
        self._pending = _PendingRows(rows, h_out, m_out, done)

    # Reads give host rows: the state is there because it does not fit the device (the exact
    # recurrence moves what it reads to the device itself).
    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        self.settle()
        return self.h[start:stop]

    def read_momentum_rows(self, start: int, stop: int) -> torch.Tensor:
        self.settle()
        if self.m is None:
            return torch.zeros(stop - start, self.width, dtype=self.dtype)
        return self.m[start:stop]

    def write_rows(self, start: int, stop: int, h: torch.Tensor, m: torch.Tensor | None) -> None:
        self.settle()
        self.h[start:stop].copy_(h)
        if self.m is not None and m is not None:
            self.m[start:stop].copy_(m)
