"""One SGD step as torch.optim.SGD takes it, and the coefficients the recurrences read from it.

Training is torch.optim.SGD with momentum p, weight decay lambda, dampening 0, no Nesterov:

    d = g_batch(w_{t-1}) + lambda w_{t-1};  v_t = p v_{t-1} + d;  w_t = w_{t-1} - eta_t v_t

The recorder, the trajectory replay and leave-one-out retraining all step through
`sgd_step`, so the three agree to the bit on a given device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from hydra_store.core.parameters import ParameterLayout
from hydra_store.errors import UnsupportedOptimizerError


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


def check_optimizer_covers_model(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer that does not update exactly the model's trainable parameters."""
    model_params = {id(p) for p in model.parameters() if p.requires_grad}
    opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if model_params != opt_params:
        raise UnsupportedOptimizerError(
            "the optimizer must update exactly the model's trainable parameters; pass "
            "model.parameters() to torch.optim.SGD"
        )


def velocity_of(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, layout: ParameterLayout
) -> torch.Tensor:
    """The SGD momentum buffers as one flat vector (zeros before the first step)."""
    named = dict(model.named_parameters())
    parts = []
    for name in layout.names:
        buf = optimizer.state.get(named[name], {}).get("momentum_buffer")
        parts.append(
            torch.zeros_like(named[name]).reshape(-1) if buf is None else buf.detach().reshape(-1)
        )
    return torch.cat(parts)


def sgd_optimizer(
    model: torch.nn.Module,
    layout: ParameterLayout,
    first: SGDSettings | None,
    velocity: torch.Tensor | None = None,
) -> torch.optim.SGD:
    """A torch.optim.SGD over the model, set up with `first`'s coefficients and, when given and
    non-zero, the momentum buffers of a stored `velocity` (so that replay can start mid-run)."""
    first = first or SGDSettings(0.1, 0.0, 0.0)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=first.lr, momentum=first.momentum, weight_decay=first.weight_decay
    )
    if velocity is not None and first.momentum != 0 and bool(torch.any(velocity != 0)):
        named = dict(model.named_parameters())
        for name, view in layout.unflatten(velocity).items():
            optimizer.state[named[name]]["momentum_buffer"] = view.clone()
    return optimizer


def apply_settings(optimizer: torch.optim.Optimizer, settings: SGDSettings) -> None:
    """Set one recorded step's lr, momentum and weight decay on every param group."""
    for group in optimizer.param_groups:
        group.update(lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)


def sgd_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: ParameterLayout,
    gradients: torch.Tensor,
) -> None:
    """Take the optimizer step with the mean over rows of `gradients` (B, P) as the gradient."""
    mean = gradients.mean(dim=0)
    named = dict(model.named_parameters())
    for name, view in layout.unflatten(mean).items():
        named[name].grad = view
    optimizer.step()
    for name in layout.names:
        named[name].grad = None


def run_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: ParameterLayout,
    steps: Iterable[tuple[np.ndarray, SGDSettings]],
    gradient_of: Callable[[np.ndarray], torch.Tensor],
) -> Iterator[tuple[int, np.ndarray, SGDSettings]]:
    """The SGD loop of replay and retraining. For each (batch, settings): set the settings,
    yield (k, batch, settings) while the model still holds the weights before the step, then
    take `gradient_of(batch)` ((rows, P), averaged over rows) and step."""
    for k, (batch, settings) in enumerate(steps):
        apply_settings(optimizer, settings)
        yield k, batch, settings
        sgd_step(model, optimizer, layout, gradient_of(batch))
