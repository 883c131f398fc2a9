"""Where the tracked hypergradient state lives: the tracked-state seam.

The approximate and exact recurrences only ever touch the state through `TrackedState`: an
affine update of some rows `(h, m) <- A_r (h, m) + (alpha_r, beta_r) g_r`, reads of row blocks,
and (for the exact recurrence) writes of row blocks. A backend is any implementation of it; the
recorder builds one through a `StateFactory` (default: `InMemoryTrackedState`). How to add one:
docs/design.md, "Adding a state backend".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from hydra_store.core.kernels import update_rows_cpu
from hydra_store.errors import InvalidArgumentError


class TrackedState(ABC):
    """Per tracked sample: `h = dw/d eps_i` and, with momentum, `m = dv/d eps_i`, each a vector
    of `width` entries (the parameters, or their projection)."""

    n_rows: int
    width: int
    has_momentum: bool
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def update_rows(
        self,
        rows: torch.Tensor,
        transition: torch.Tensor,
        injection: torch.Tensor | None = None,
        gradients: torch.Tensor | None = None,
    ) -> None:
        """For each row r: `(h, m) <- transition[r] @ (h, m) + injection[r] * gradients[r]`.

        `rows`: (R,) int64, distinct, on any device. `transition`: (R, 2, 2). `injection`: (R, 2)
        coefficients of the gradient for h and m. Without momentum only `transition[:, 0, 0]` and
        `injection[:, 0]` are used.
        """

    @abstractmethod
    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        """h of rows [start, stop) as a (stop - start, P) tensor (read only), on `device` or
        in host memory."""

    @abstractmethod
    def read_momentum_rows(self, start: int, stop: int) -> torch.Tensor:
        """m of rows [start, stop); zeros when the state has no momentum."""

    @abstractmethod
    def write_rows(self, start: int, stop: int, h: torch.Tensor, m: torch.Tensor | None) -> None:
        """Replace h (and m, with momentum) of rows [start, stop)."""

    @property
    def nbytes(self) -> int:
        return state_nbytes(self.n_rows, self.width, self.has_momentum, self.dtype)


def state_nbytes(n_rows: int, width: int, has_momentum: bool, dtype: torch.dtype) -> int:
    """Bytes of a dense state: rows x width x itemsize, twice with momentum."""
    per = torch.empty((), dtype=dtype).element_size()
    return n_rows * width * per * (2 if has_momentum else 1)


class StateFactory(Protocol):
    """Builds the tracked state of a recording (the recorder calls it once per recurrence)."""

    def __call__(
        self,
        n_rows: int,
        width: int,
        *,
        has_momentum: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> TrackedState: ...


def affine_row_update(
    h_old: torch.Tensor,
    m_old: torch.Tensor | None,
    transition: torch.Tensor,
    injection: torch.Tensor | None,
    gradients: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(h, m) <- transition @ (h, m) + injection * gradients` for a block of gathered rows
    (`h_old`, `m_old` (R, width), which it may overwrite); `transition` and `injection` in the
    rows' dtype and device."""
    if m_old is None:
        h_new = h_old.mul_(transition[:, 0, 0, None])
        if gradients is not None:
            h_new.addcmul_(gradients, injection[:, 0, None])
        return h_new, None
    h_new = torch.mul(h_old, transition[:, 0, 0, None])
    h_new.addcmul_(m_old, transition[:, 0, 1, None])
    m_new = m_old.mul_(transition[:, 1, 1, None])
    m_new.addcmul_(h_old, transition[:, 1, 0, None])
    if gradients is not None:
        h_new.addcmul_(gradients, injection[:, 0, None])
        m_new.addcmul_(gradients, injection[:, 1, None])
    return h_new, m_new


def allocate_dense_state(
    n_rows: int,
    width: int,
    *,
    has_momentum: bool,
    dtype: torch.dtype,
    device: torch.device,
    remedy: str = "track fewer samples (--track N)",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zeroed h (and m, with momentum) of n_rows x width on `device`, or one error line that
    says how much could not be allocated where, and `remedy`."""
    if n_rows <= 0 or width <= 0:
        raise InvalidArgumentError(
            f"tracked state needs at least one row and one column, got {n_rows}x{width}"
        )
    try:
        h = torch.zeros(n_rows, width, dtype=dtype, device=device)
        m = torch.zeros(n_rows, width, dtype=dtype, device=device) if has_momentum else None
    except (RuntimeError, MemoryError) as error:
        gib = state_nbytes(n_rows, width, has_momentum, dtype) / 2**30
        raise InvalidArgumentError(
            f"the tracked state needs {gib:.1f} GiB on {device} and could not be allocated; "
            f"{remedy}"
        ) from error
    return h, m


class InMemoryTrackedState(TrackedState):
    """The whole state as dense tensors on one device (host RAM or GPU memory)."""

    def __init__(
        self,
        n_rows: int,
        width: int,
        *,
        has_momentum: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_rows, self.width = n_rows, width
        self.has_momentum = has_momentum
        self.dtype = dtype
        self.device = torch.device(device)
        self._scratch: torch.Tensor | None = None
        self.h, self.m = allocate_dense_state(
            n_rows, width, has_momentum=has_momentum, dtype=dtype, device=self.device
        )

    @classmethod
    def on_buffers(
        cls, h: torch.Tensor, m: torch.Tensor | None, n_rows: int
    ) -> InMemoryTrackedState:
        """A zeroed state on the first `n_rows` rows of existing (rows >= n_rows, width)
        buffers: a caller that records several states one after another reuses one allocation
        (fresh memory is zeroed page by page by the kernel, then again by torch: at 4 GiB,
        seconds each time)."""
        state = cls.__new__(cls)
        state.n_rows, state.width = n_rows, int(h.shape[1])
        state.has_momentum = m is not None
        state.dtype, state.device = h.dtype, h.device
        state._scratch = None
        state.h = h[:n_rows].zero_()
        state.m = None if m is None else m[:n_rows].zero_()
        return state

    # On the CPU the fused numba kernel does every update. On other devices (CUDA): above this
    # many parameters a row is long enough that in-place passes per row view beat gathering the
    # rows into a block (index_select), computing, and scattering them back (index_copy_); at
    # P = 61,706 and 64 rows on the CPU, 13 ms against 19 ms. Below it, the per-row Python
    # loop's dispatch overhead dominates and the block path wins.
    ROWWISE_MIN_PARAMS = 16_384

    def update_rows(
        self,
        rows: torch.Tensor,
        transition: torch.Tensor,
        injection: torch.Tensor | None = None,
        gradients: torch.Tensor | None = None,
    ) -> None:
        if self.device.type == "cpu":
            self._update_fused(rows, transition, injection, gradients)
        elif self.width >= self.ROWWISE_MIN_PARAMS:
            self._update_rowwise(rows, transition, injection, gradients)
        else:
            self._update_block(rows, transition, injection, gradients)

    def _update_fused(self, rows, transition, injection=None, gradients=None) -> None:
        """One fused pass per row on the CPU (hydra_store.kernels, numba)."""
        update_rows_cpu(
            self.h.numpy(),
            None if self.m is None else self.m.numpy(),
            rows.cpu().numpy(),
            transition.numpy(),
            None if injection is None else injection.numpy(),
            None if gradients is None else gradients.detach().numpy(),
        )

    def _update_block(self, rows, transition, injection=None, gradients=None) -> None:
        # index_select and index_copy_ on a GPU refuse row indices in host memory.
        rows = rows.to(self.device)
        transition = transition.to(device=self.device, dtype=self.dtype)
        if injection is not None:
            injection = injection.to(device=self.device, dtype=self.dtype)
        h_old = self.h.index_select(0, rows)
        m_old = None if self.m is None else self.m.index_select(0, rows)
        h_new, m_new = affine_row_update(h_old, m_old, transition, injection, gradients)
        self.h.index_copy_(0, rows, h_new)
        if self.m is not None:
            self.m.index_copy_(0, rows, m_new)

    def _update_rowwise(self, rows, transition, injection=None, gradients=None) -> None:
        coefficients = transition.to(torch.float64).cpu().tolist()
        injected = None if gradients is None else injection.to(torch.float64).cpu().tolist()
        row_list = rows.cpu().tolist()
        if self.m is None:
            for k, r in enumerate(row_list):
                h = self.h[r].mul_(coefficients[k][0][0])
                if injected is not None:
                    h.add_(gradients[k], alpha=injected[k][0])
            return
        if self._scratch is None:
            self._scratch = torch.empty(self.width, dtype=self.dtype, device=self.device)
        old_h = self._scratch
        for k, r in enumerate(row_list):
            (a, b), (c, d) = coefficients[k]
            h, m = self.h[r], self.m[r]
            old_h.copy_(h)
            h.mul_(a).add_(m, alpha=b)
            m.mul_(d).add_(old_h, alpha=c)
            if injected is not None:
                h.add_(gradients[k], alpha=injected[k][0])
                m.add_(gradients[k], alpha=injected[k][1])

    def read_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.h[start:stop]

    def read_momentum_rows(self, start: int, stop: int) -> torch.Tensor:
        if self.m is None:
            return torch.zeros_like(self.h[start:stop])
        return self.m[start:stop]

    def write_rows(self, start: int, stop: int, h: torch.Tensor, m: torch.Tensor | None) -> None:
        self.h[start:stop].copy_(h)
        if self.m is not None and m is not None:
            self.m[start:stop].copy_(m)
