"""The HyDRA hypergradient recurrences (DESIGN.md section 1): pure torch, no I/O.

Training is torch.optim.SGD with momentum p, weight decay lambda, dampening 0, no Nesterov:

    d = g_batch(w_{t-1}) + lambda w_{t-1};  v_t = p v_{t-1} + d;  w_t = w_{t-1} - eta_t v_t

and per tracked sample i, with h = dw/d eps_i and m = dv/d eps_i:

    m_t = p m_{t-1} + (H_{t-1} + lambda I) h_{t-1} + [i in batch_t] (N / B_t) g_{t,i}
    h_t = h_{t-1} - eta_t m_t

`ApproximateHypergradient` drops H (the paper's Algorithm 1) and updates a sample only when it is
in a batch; `ExactHypergradient` keeps H through Hessian-vector products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from hydra_store.errors import InvalidArgumentError, UnsupportedOptimizerError
from hydra_store.parameters import ParameterLayout
from hydra_store.state import TrackedState


@dataclass(frozen=True)
class SGDSettings:
    """The coefficients of one SGD step, read from the optimizer just before the step."""

    lr: float
    momentum: float
    weight_decay: float


def read_sgd_settings(optimizer: torch.optim.Optimizer) -> SGDSettings:
    """Read (and check) lr, momentum and weight decay from an SGD optimizer's param groups.

    Raises UnsupportedOptimizerError for anything the HyDRA recurrence does not model.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise UnsupportedOptimizerError(
            f"HyDRA models plain SGD (with momentum and weight decay); got "
            f"{type(optimizer).__name__}. Use torch.optim.SGD"
        )
    settings = set()
    for group in optimizer.param_groups:
        if group.get("nesterov", False):
            raise UnsupportedOptimizerError(
                "Nesterov momentum is not supported: set nesterov=False"
            )
        if group.get("dampening", 0) != 0:
            raise UnsupportedOptimizerError("SGD dampening is not supported: set dampening=0")
        if group.get("maximize", False):
            raise UnsupportedOptimizerError("maximize=True is not supported: set maximize=False")
        lr = group["lr"]
        lr = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        settings.add((lr, float(group["momentum"]), float(group["weight_decay"])))
    if len(settings) != 1:
        raise UnsupportedOptimizerError(
            "all SGD param groups must share lr, momentum and weight decay; got "
            f"{sorted(settings)}. Use one param group"
        )
    lr, momentum, weight_decay = settings.pop()
    if not lr > 0 or not np.isfinite(lr):
        raise UnsupportedOptimizerError(f"the learning rate must be positive and finite, got {lr}")
    if not 0 <= momentum < 1:
        raise UnsupportedOptimizerError(f"momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise UnsupportedOptimizerError(f"weight decay must be >= 0, got {weight_decay}")
    return SGDSettings(lr=lr, momentum=momentum, weight_decay=weight_decay)


def transition_matrix(settings: SGDSettings) -> np.ndarray:
    """M_t with (h_t, m_t) = M_t (h_{t-1}, m_{t-1}) for a sample outside the batch (no Hessian)."""
    eta, p, lam = settings.lr, settings.momentum, settings.weight_decay
    return np.array([[1.0 - eta * lam, -eta * p], [lam, p]], dtype=np.float64)


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss of each sample: cross-entropy on logits."""
    return F.cross_entropy(logits, targets, reduction="none")


class PerSampleGradients:
    """Per-sample loss gradients of a model with torch.func, written into a reused (B, P) buffer.

    Reusing the buffer matters: a fresh 10-50 MB allocation per step is returned to the OS and
    mapped again by glibc every step, which costs more than the arithmetic (DESIGN.md section 5).
    """

    def __init__(self, model: torch.nn.Module, layout: ParameterLayout) -> None:
        self.model = model
        self.layout = layout
        self._buffer: torch.Tensor | None = None

        def sample_loss(params, buffers, x, y):
            logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return per_sample_loss(logits, y.unsqueeze(0)).squeeze(0)

        self._grad = vmap(grad_and_value(sample_loss), in_dims=(None, None, 0, 0))

    def parameters(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.layout.names}

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (losses (B,), gradients (B, P)); the gradients live in a reused buffer."""
        batch = inputs.shape[0]
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        grads, losses = self._grad(self.parameters(), buffers, inputs, targets)
        ref = next(iter(grads.values()))
        if (
            self._buffer is None
            or self._buffer.shape[0] < batch
            or self._buffer.dtype != ref.dtype
            or self._buffer.device != ref.device
        ):
            self._buffer = torch.empty(
                batch, self.layout.n_params, dtype=ref.dtype, device=ref.device
            )
        out = self._buffer[:batch]
        self.layout.flatten_batched(grads, out)
        return losses.detach(), out


def per_sample_loss_function(
    model: torch.nn.Module, layout: ParameterLayout, inputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-sample training losses (B,) of one batch as a function of the flat parameters."""
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def losses(flat: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (layout.unflatten(flat), buffers), (inputs,))
        return per_sample_loss(logits, targets)

    return losses


def batch_loss_function(
    model: torch.nn.Module, layout: ParameterLayout, inputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean training loss of one batch as a function of the flat parameter vector."""
    losses = per_sample_loss_function(model, layout, inputs, targets)
    return lambda flat: losses(flat).mean()


def hessian_vector_products(
    loss: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """H(point) @ v for each row v of `vectors` (forward-over-reverse, vmapped)."""

    def hvp(v):
        return jvp(grad(loss), (point,), (v,))[1]

    return vmap(hvp)(vectors)


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

    def step(self, batch_index: np.ndarray, gradients: torch.Tensor, settings: SGDSettings) -> None:
        """Advance all tracked samples by one SGD step whose batch is `batch_index`.

        `gradients` (B, P) are the per-sample loss gradients of the batch at w_{t-1}.
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
            scale = self.selection.n_train / batch_index.size
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


class ExactHypergradient:
    """The Hessian-aware recurrence: every tracked sample, every step, one HVP each.

    For hundreds to thousands of tracked samples; the gold standard the approximation is judged
    against. HVPs are vmapped over chunks of `chunk_size` rows.
    """

    def __init__(
        self,
        state: TrackedState,
        selection: TrackedSelection,
        model: torch.nn.Module,
        layout: ParameterLayout,
        *,
        chunk_size: int = 32,
    ) -> None:
        if not hasattr(state, "h"):
            raise InvalidArgumentError("the exact recurrence needs an in-memory tracked state")
        self.state = state
        self.selection = selection
        self.model = model
        self.layout = layout
        self.chunk_size = chunk_size
        self.step_count = 0

    def step(
        self,
        weights_before: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_index: np.ndarray,
        gradients: torch.Tensor,
        settings: SGDSettings,
    ) -> None:
        """Advance every tracked sample by one step; `weights_before` is the flat w_{t-1}."""
        if settings.momentum != 0 and not self.state.has_momentum:
            raise UnsupportedOptimizerError(
                "momentum changed from 0 to a positive value during training"
            )
        batch_index = np.asarray(batch_index, dtype=np.int64)
        loss = batch_loss_function(self.model, self.layout, inputs, targets)
        h, m = self.state.h, self.state.m
        p, lam, eta = settings.momentum, settings.weight_decay, settings.lr
        new_m = torch.empty_like(h)
        for start in range(0, h.shape[0], self.chunk_size):
            block = h[start : start + self.chunk_size]
            hv = hessian_vector_products(loss, weights_before, block)
            hv.add_(block, alpha=lam)
            if m is not None:
                hv.add_(m[start : start + self.chunk_size], alpha=p)
            new_m[start : start + self.chunk_size] = hv
        batch = self.selection.batch_rows(batch_index, gradients)
        if batch is not None:
            scale = self.selection.n_train / batch_index.size
            new_m.index_add_(0, batch.rows, batch.gradients, alpha=scale)
        h.add_(new_m, alpha=-eta)
        if m is not None:
            m.copy_(new_m)
        self.step_count += 1

    def hypergradient_rows(self, start: int, stop: int) -> torch.Tensor:
        return self.state.read_rows(start, stop)
