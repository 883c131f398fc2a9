"""The HyDRA hypergradient recurrences (docs/design.md, "The math"): pure torch, no I/O.

Per tracked sample i, with h = dw/d eps_i and m = dv/d eps_i (see hydra_store.core.sgd for the
SGD step):

    m_t = p m_{t-1} + (H_{t-1} + lambda I) h_{t-1} + [i in batch_t] (N / B_t) g_{t,i}
    h_t = h_{t-1} - eta_t m_t

`ApproximateHypergradient` drops H (the paper's Algorithm 1) and updates a sample only when it is
in a batch; `ExactHypergradient` keeps H through Hessian-vector products. Both reach their state
only through the `TrackedState` interface.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hydra_store.core.gradients import batch_loss_function, hessian_vector_products
from hydra_store.core.losses import LossFunction, cross_entropy
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.sgd import SGDSettings, transition_matrix
from hydra_store.core.state import TrackedState
from hydra_store.errors import InvalidArgumentError, UnsupportedOptimizerError

# The store variable of each recurrence, and the recording modes that run it.
RECURRENCE_VARIABLES = (
    ("hypergradient", ("approximate", "both")),
    ("hypergradient_exact", ("exact", "both")),
)


def tracked_variables(mode: str) -> list[str]:
    """The hypergradient variables a recording mode writes (none for `trajectory`)."""
    return [name for name, modes in RECURRENCE_VARIABLES if mode in modes]


def named_trackers(approximate: object | None, exact: object | None) -> list[tuple[str, object]]:
    """(store variable, recurrence) of the recurrences that exist."""
    pairs = zip((name for name, _ in RECURRENCE_VARIABLES), (approximate, exact), strict=True)
    return [(name, tracker) for name, tracker in pairs if tracker is not None]


@dataclass
class BatchRows:
    """The tracked samples of one batch: state rows and their summed per-sample gradients."""

    rows: torch.Tensor  # (R,) int64, distinct
    gradients: torch.Tensor  # (R, P)


class TrackedSelection:
    """Which training samples are tracked, and the state row of each."""

    def __init__(self, n_train: int, tracked_index: np.ndarray) -> None:
        tracked_index = np.asarray(tracked_index, dtype=np.int64)
        if tracked_index.ndim != 1 or tracked_index.size == 0:
            raise InvalidArgumentError("the tracked selection must be a non-empty list of indices")
        if tracked_index.min() < 0 or tracked_index.max() >= n_train:
            raise InvalidArgumentError(
                f"tracked indices must lie in [0, {n_train}); got "
                f"{tracked_index.min()}..{tracked_index.max()}"
            )
        if np.unique(tracked_index).size != tracked_index.size:
            raise InvalidArgumentError("the tracked selection lists some index more than once")
        self.n_train = n_train
        self.index = tracked_index
        self.row_of = np.full(n_train, -1, dtype=np.int64)
        self.row_of[tracked_index] = np.arange(tracked_index.size)

    @property
    def n_rows(self) -> int:
        return int(self.index.size)

    def batch_rows(self, batch_index: np.ndarray, gradients: torch.Tensor) -> BatchRows | None:
        """Rows of the tracked samples in a batch, with gradients summed over repeats.

        A sample drawn twice into one batch carries its weight eps_i in both slots, so both
        gradients inject into its state.
        """
        rows = self.row_of[batch_index]
        keep = np.nonzero(rows >= 0)[0]
        if keep.size == 0:
            return None
        rows = rows[keep]
        device = gradients.device
        if keep.size == batch_index.size:
            selected = gradients
        else:
            selected = gradients.index_select(0, torch.as_tensor(keep, device=device))
        unique, inverse = np.unique(rows, return_inverse=True)
        if unique.size == rows.size:
            return BatchRows(torch.as_tensor(rows, device=device), selected)
        summed = torch.zeros(unique.size, gradients.shape[1], dtype=gradients.dtype, device=device)
        summed.index_add_(0, torch.as_tensor(inverse, device=device), selected)
        return BatchRows(torch.as_tensor(unique, device=device), summed)


class ApproximateHypergradient:
    """Algorithm 1 (Hessian dropped) with the lazy update: O(B P) work per step.

    A sample outside the batch evolves by a 2x2 map shared by all samples and parameters, so a
    row is left alone until it is next in a batch (or is read). For every step s at which some
    row was last brought up to date, the window keeps the product of the M's since s, as a small
    (K, 2, 2) float64 array updated every step; a row is brought forward by one 2x2 product.
    When the window grows past `max_window` entries, the rows of the oldest entry are brought up
    to date so that the entry can be dropped.
    """

    def __init__(
        self, state: TrackedState, selection: TrackedSelection, *, max_window: int = 4096
    ) -> None:
        if selection.n_rows != state.n_rows:
            raise InvalidArgumentError("state rows and tracked selection differ in size")
        if max_window < 2:
            raise InvalidArgumentError("max_window must be at least 2")
        self.state = state
        self.selection = selection
        self.max_window = max_window
        self.step_count = 0
        self.last_step = np.zeros(state.n_rows, dtype=np.int64)
        self.touched = np.zeros(state.n_rows, dtype=bool)
        self._window_steps = np.zeros(1, dtype=np.int64)
        self._window_product = np.eye(2)[None].copy()
        self._window_count = np.array([state.n_rows], dtype=np.int64)

    def _products_for(self, rows: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self._window_steps, self.last_step[rows])
        return self._window_product[positions]

    def _reassign(self, rows: np.ndarray) -> None:
        """Mark `rows` as current at the present step (their pending product is identity)."""
        t = self.step_count
        positions = np.searchsorted(self._window_steps, self.last_step[rows])
        np.subtract.at(self._window_count, positions, 1)
        self.last_step[rows] = t
        if self._window_steps[-1] == t:
            self._window_count[-1] += rows.size
        else:
            self._window_steps = np.append(self._window_steps, t)
            self._window_product = np.concatenate([self._window_product, np.eye(2)[None]])
            self._window_count = np.append(self._window_count, rows.size)
        keep = self._window_count > 0
        if not keep.all():
            self._window_steps = self._window_steps[keep]
            self._window_product = self._window_product[keep]
            self._window_count = self._window_count[keep]

    def step(
        self,
        batch_index: np.ndarray,
        gradients: torch.Tensor,
        settings: SGDSettings,
        *,
        batch_size: int | None = None,
    ) -> None:
        """Advance all tracked samples by one SGD step whose batch is `batch_index`.

        `gradients` (B, P) are the per-sample loss gradients of the batch at w_{t-1}. A caller
        that tracks only some samples may pass only their slots of the batch, with the whole
        batch's size as `batch_size` (the B_t of the N / B_t injection scale).
        """
        if settings.momentum != 0 and not self.state.has_momentum:
            raise UnsupportedOptimizerError(
                "momentum changed from 0 to a positive value during training; the tracked state "
                "was allocated without momentum. Start the recording with the final momentum"
            )
        batch_index = np.asarray(batch_index, dtype=np.int64)
        transition = transition_matrix(settings)
        batch = self.selection.batch_rows(batch_index, gradients)
        rows = None
        if batch is not None:
            rows = batch.rows.cpu().numpy()
            coefficients = np.einsum("ij,rjk->rik", transition, self._products_for(rows))
            scale = self.selection.n_train / (batch_size or batch_index.size)
            injection = np.tile(np.array([-settings.lr * scale, scale]), (rows.size, 1))
            self.state.update_rows(
                batch.rows,
                torch.from_numpy(coefficients),
                torch.from_numpy(injection),
                batch.gradients,
            )
            self.touched[rows] = True
        self._window_product = np.einsum("ij,kjl->kil", transition, self._window_product)
        self.step_count += 1
        if rows is not None:
            self._reassign(rows)
        while self._window_steps.size > self.max_window:
            self.synchronize_rows(np.nonzero(self.last_step == self._window_steps[0])[0])

    def synchronize_rows(self, rows: np.ndarray) -> None:
        """Bring `rows` up to the current step; untouched rows are zero and need no arithmetic."""
        rows = rows[self.last_step[rows] != self.step_count]
        if rows.size == 0:
            return
        live = rows[self.touched[rows]]
        if live.size:
            self.state.update_rows(
                torch.as_tensor(live, device=self.state.device),
                torch.from_numpy(self._products_for(live)),
            )
        self._reassign(rows)

    def hypergradient_rows(self, start: int, stop: int) -> torch.Tensor:
        """h_t of rows [start, stop) at the current step."""
        self.synchronize_rows(np.arange(start, stop))
        return self.state.read_rows(start, stop)

    def lazy_state(self) -> dict[str, int | np.ndarray]:
        """The lazy update's bookkeeping. With the state's rows as they are (not brought
        forward: that would round differently from a run that never stopped), it is all a
        resumed recording needs to go on exactly as the uninterrupted one."""
        return {
            "step_count": self.step_count,
            "last_step": self.last_step.copy(),
            "touched": self.touched.copy(),
            "window_steps": self._window_steps.copy(),
            "window_product": self._window_product.copy(),
            "window_count": self._window_count.copy(),
        }

    def restore_lazy_state(self, saved: dict[str, int | np.ndarray]) -> None:
        """Take back what `lazy_state` returned (the state's rows are restored separately)."""
        n_rows = self.state.n_rows
        last_step, touched = np.asarray(saved["last_step"]), np.asarray(saved["touched"])
        if last_step.shape != (n_rows,) or touched.shape != (n_rows,):
            raise InvalidArgumentError(
                f"the saved lazy state has {last_step.shape[0]} rows; this one has {n_rows}"
            )
        self.step_count = int(saved["step_count"])
        self.last_step = last_step.astype(np.int64)
        self.touched = touched.astype(bool)
        self._window_steps = np.asarray(saved["window_steps"], dtype=np.int64)
        self._window_product = np.asarray(saved["window_product"], dtype=np.float64)
        self._window_count = np.asarray(saved["window_count"], dtype=np.int64)


class ExactHypergradient:
    """The Hessian-aware recurrence: every tracked sample, every step, one HVP each.

    For hundreds to thousands of tracked samples; the gold standard the approximation is judged
    against. Rows are read, advanced and written back in blocks of `chunk_size` through the
    `TrackedState` interface (HVPs vmapped over a block), so any state backend serves.
    """

    def __init__(
        self,
        state: TrackedState,
        selection: TrackedSelection,
        model: torch.nn.Module,
        layout: ParameterLayout,
        *,
        chunk_size: int = 32,
        loss: LossFunction = cross_entropy,
    ) -> None:
        if selection.n_rows != state.n_rows:
            raise InvalidArgumentError("state rows and tracked selection differ in size")
        if state.width != layout.n_params:
            raise InvalidArgumentError(
                "the exact recurrence needs the full hypergradient (its Hessian-vector products "
                f"act on all {layout.n_params} parameters); the state tracks {state.width}. "
                "Record the exact mode without a projection"
            )
        self.state = state
        self.selection = selection
        self.model = model
        self.layout = layout
        self.chunk_size = chunk_size
        self.loss = loss
        self.step_count = 0

    def step(
        self,
        weights_before: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_index: np.ndarray,
        gradients: torch.Tensor,
        settings: SGDSettings,
        *,
        batch_index_tracked: np.ndarray | None = None,
    ) -> None:
        """Advance every tracked sample by one step; `weights_before` is the flat w_{t-1}.

        `inputs`, `targets` and `batch_index` are the whole batch (the Hessian is the batch
        loss's). `gradients` are the per-sample gradients of every slot, or, with
        `batch_index_tracked`, only of the slots listed there (a subset of the batch).
        """
        if settings.momentum != 0 and not self.state.has_momentum:
            raise UnsupportedOptimizerError(
                "momentum changed from 0 to a positive value during training"
            )
        batch_index = np.asarray(batch_index, dtype=np.int64)
        loss = batch_loss_function(self.model, self.layout, inputs, targets, self.loss)
        p, lam, eta = settings.momentum, settings.weight_decay, settings.lr
        injected = batch_index if batch_index_tracked is None else batch_index_tracked
        batch = self.selection.batch_rows(np.asarray(injected, dtype=np.int64), gradients)
        scale = self.selection.n_train / batch_index.size
        rows = None if batch is None else batch.rows.cpu().numpy()
        for start in range(0, self.state.n_rows, self.chunk_size):
            stop = min(self.state.n_rows, start + self.chunk_size)
            device = weights_before.device
            h = self.state.read_rows(start, stop).to(device)
            new_m = hessian_vector_products(loss, weights_before, h)
            new_m.add_(h, alpha=lam)
            if self.state.has_momentum:
                new_m.add_(self.state.read_momentum_rows(start, stop).to(device), alpha=p)
            if rows is not None:
                inside = np.nonzero((rows >= start) & (rows < stop))[0]
                if inside.size:
                    local = torch.as_tensor(rows[inside] - start, device=new_m.device)
                    picked = batch.gradients[torch.as_tensor(inside, device=new_m.device)]
                    new_m.index_add_(0, local, picked.to(new_m.dtype), alpha=scale)
            h_new = h - eta * new_m
            self.state.write_rows(start, stop, h_new, new_m if self.state.has_momentum else None)
        self.step_count += 1

    def hypergradient_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.state.read_rows(start, stop)
