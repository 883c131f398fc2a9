"""Per-sample losses and their gradients, Hessian-vector products, and the losses a model is
judged by: pure torch (torch.func), no I/O."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.func import functional_call, grad, grad_and_value, jvp, vmap

from hydra_store.core.losses import CROSS_ENTROPY, LossFunction, PerSampleLoss, cross_entropy
from hydra_store.core.model_state import frozen_running_stats, needs_batch_forward
from hydra_store.core.parameters import ParameterLayout, get_flat_parameters

# The default training loss of each sample (cross-entropy on logits); every function below
# takes another per-sample loss as `loss` (core/losses.py).
per_sample_loss = cross_entropy


class PerSampleGradients:
    """Per-sample loss gradients of a model with torch.func, written into a reused (B, P) buffer.

    Reusing the buffer matters: a fresh 10-50 MB allocation per step is returned to the OS and
    mapped again by glibc every step, which costs more than the arithmetic (docs/design.md, "Measured facts").

    A model in training mode with BatchNorm or dropout (core/model_state.py) takes them from one
    forward pass of the whole batch instead (`batched_backward_gradients`): that pass is the
    step's one forward pass, so it updates the running statistics as training does.
    """

    def __init__(
        self, model: torch.nn.Module, layout: ParameterLayout, loss: LossFunction = cross_entropy
    ) -> None:
        self.model = model
        self.layout = layout
        self.loss = loss
        self._buffer: torch.Tensor | None = None

        def sample_loss(params, buffers, x, y):
            outputs = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return loss(outputs, y.unsqueeze(0)).squeeze(0)

        self._grad = vmap(grad_and_value(sample_loss), in_dims=(None, None, 0, 0))

    def parameters(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.layout.names}

    def __call__(
        self, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (losses (B,), gradients (B, P)); the gradients live in a reused buffer."""
        batch = inputs.shape[0]
        if needs_batch_forward(self.model):
            return batched_backward_gradients(self.model, self.layout, inputs, targets, self.loss)
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


def batched_backward_gradients(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), per-sample gradients (B, P)) from one forward pass of the whole batch and
    one batched backward pass (`is_grads_batched`): row i is d(l_i)/dw with l_i the loss of
    sample i in this batch, so through BatchNorm's batch statistics it depends on the other
    samples (the gradient of the weighted batch loss with respect to sample i's weight, times
    B). Their mean is the gradient of the batch's mean loss. The forward pass updates the
    running statistics once, as a training step does."""
    every = torch.arange(int(inputs.shape[0]), device=inputs.device)
    losses, _, rows = slot_gradients(model, layout, inputs, targets, every, loss, mean=False)
    return losses, rows


def slot_gradients(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    slots: torch.Tensor,
    loss: LossFunction = cross_entropy,
    *,
    mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(losses (B,), the gradient of the batch's mean loss as (1, P) or None without `mean`,
    d(l_i)/dw of the batch slots `slots` only (k, P)) from one forward pass of the whole batch.

    For a batch-coupled model (BatchNorm, dropout) a per-sample gradient is one vector of a
    batched backward pass, about one plain backward pass of work each; a step needs the rows of
    its tracked samples only, and the mean gradient it steps with is one plain backward pass,
    so a step drawing k tracked samples costs about 1 + k backward passes instead of B. The
    mean gradient is computed as `batch_gradient` computes it, so that a replay by
    `step_gradient: batch_backward` retakes the step to the bit. The forward pass updates the
    running statistics once, as a training step does."""
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    losses = loss(model(inputs), targets)
    k = int(slots.numel())
    mean_gradient = None
    if mean:
        grads = torch.autograd.grad(losses.mean(), params, retain_graph=k > 0)
        mean_gradient = torch.cat([g.reshape(-1) for g in grads])[None]
    if k == 0:
        return losses.detach(), mean_gradient, losses.new_empty(0, layout.n_params).detach()
    picks = torch.zeros(k, int(losses.shape[0]), dtype=losses.dtype, device=losses.device)
    picks[torch.arange(k, device=losses.device), slots.to(losses.device)] = 1
    grads = torch.autograd.grad(losses, params, grad_outputs=picks, is_grads_batched=True)
    rows = torch.cat([g.reshape(k, -1) for g in grads], dim=1)
    return losses.detach(), mean_gradient, rows


def slot_fingerprints(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    direction: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> torch.Tensor:
    """<g_i, u> of every slot of the batch (B,), g_i = d(l_i)/dw through the batch's
    statistics and u = `direction`, by one forward-mode pass (a jvp) of the batch's per-sample
    losses: a partitioned recording's fingerprints without forming the B per-sample gradients.
    It updates no running statistics; run it under the step's randomness, so that it sees the
    step's dropout masks."""
    point = get_flat_parameters(model, layout)
    losses = per_sample_loss_function(model, layout, inputs, targets, loss)
    return jvp(losses, (point,), (direction.to(point.device, point.dtype),))[1].detach()


@contextlib.contextmanager
def evaluation_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (running statistics, no dropout), as test losses are taken."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def per_sample_loss_function(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-sample training losses (B,) of one batch as a function of the flat parameters.

    Evaluating it updates no running statistics (it is never the step's own forward pass); in
    training mode a BatchNorm layer still normalises by the batch's statistics."""
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def losses(flat: torch.Tensor) -> torch.Tensor:
        with frozen_running_stats(model):
            outputs = functional_call(model, (layout.unflatten(flat), buffers), (inputs,))
        return loss(outputs, targets)

    return losses


def batch_loss_function(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean training loss of one batch as a function of the flat parameter vector."""
    losses = per_sample_loss_function(model, layout, inputs, targets, loss)
    return lambda flat: losses(flat).mean()


def hessian_vector_products(
    loss: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor, vectors: torch.Tensor
) -> torch.Tensor:
    """H(point) @ v for each row v of `vectors` (forward-over-reverse, vmapped)."""

    def hvp(v):
        return jvp(grad(loss), (point,), (v,))[1]

    # "same": dropout draws one mask for every vector, the mask of the step's forward pass
    # (the caller runs under the step's seed, core/model_state.py `step_randomness`).
    return vmap(hvp, randomness="same")(vectors)


def batch_gradient(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample losses, the batch's mean gradient as a (1, P) tensor) by one backward pass:
    what a trajectory-only recording costs, plain training."""
    none = torch.empty(0, dtype=torch.long, device=inputs.device)
    losses, mean_gradient, _ = slot_gradients(model, layout, inputs, targets, none, loss)
    return losses, mean_gradient


def weighted_batch_gradient(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> torch.Tensor:
    """The gradient of the batch's mean of `weights` x per-sample loss, as (1, P), by one
    backward pass (leave-one-out retraining: weight 0 for the sample left out)."""
    weighted = (weights * loss(model(inputs), targets)).mean()
    params = [dict(model.named_parameters())[n] for n in layout.names]
    grads = torch.autograd.grad(weighted, params)
    return torch.cat([g.reshape(-1) for g in grads])[None]


# How a store says its steps' gradients were taken (root attribute `step_gradient`):
# the mean of the per-sample gradients, one backward pass, or one backward pass whose
# convolutions' weight gradients are the sums of their per-sample gradients (sketched
# per-sample gradients, core/sketched_gradients.py).
STEP_GRADIENT_METHODS = ("per_sample_mean", "batch_backward", "sketched_backward")


def step_gradients(
    model: torch.nn.Module,
    layout: ParameterLayout,
    per_sample: PerSampleGradients | None,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients a recorded step used, by the method the store names in `step_gradient`,
    with the loss `per_sample` takes."""
    loss = per_sample.loss if per_sample is not None else cross_entropy
    if method == "batch_backward":
        return batch_gradient(model, layout, inputs, targets, loss)
    if method == "sketched_backward":
        # Imported here: core.sketched_gradients builds on this module.
        from hydra_store.core.sketched_gradients import sketched_batch_gradient

        return sketched_batch_gradient(model, layout, inputs, targets, loss)
    return per_sample(inputs, targets)


def evaluate(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 1024,
    loss: PerSampleLoss = CROSS_ENTROPY,
) -> tuple[float, float]:
    """(mean loss, accuracy) of the model in eval mode on a set of samples, in batches, without
    gradients; the accuracy is NaN for a loss that is not a classification loss."""
    param = next(model.parameters())
    total_loss, correct = 0.0, 0
    with torch.no_grad(), evaluation_mode(model):
        for start in range(0, int(targets.shape[0]), batch_size):
            x = inputs[start : start + batch_size].to(param.device, param.dtype)
            y = targets[start : start + batch_size].to(param.device)
            outputs = model(x)
            total_loss += float(loss(outputs, y).sum())
            if loss.classification:
                correct += int((outputs.argmax(1) == y).sum())
    n = max(1, int(targets.shape[0]))
    return total_loss / n, correct / n if loss.classification else float("nan")


def mean_loss_gradient(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int = 1024,
    loss: LossFunction = cross_entropy,
) -> tuple[torch.Tensor, float]:
    """(the gradient of the mean loss over the samples at the model's weights (P,), that mean
    loss): the test direction u of a whole test set, with the model in eval mode."""
    with evaluation_mode(model):
        return _mean_loss_gradient(model, layout, inputs, targets, batch_size, loss)


def _mean_loss_gradient(model, layout, inputs, targets, batch_size, loss):
    param = next(model.parameters())
    point = get_flat_parameters(model, layout)
    total = torch.zeros_like(point)
    loss_sum = 0.0
    n = int(targets.shape[0])
    for start in range(0, n, batch_size):
        x = inputs[start : start + batch_size].to(param.device, param.dtype)
        y = targets[start : start + batch_size].to(param.device)
        losses = per_sample_loss_function(model, layout, x, y, loss)

        def summed(flat: torch.Tensor, fn=losses) -> torch.Tensor:
            return fn(flat).sum()

        total += grad(summed)(point)
        with torch.no_grad():
            loss_sum += float(losses(point).sum())
    return total / max(1, n), loss_sum / max(1, n)


def per_sample_loss_gradients(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> torch.Tensor:
    """The loss gradient of each given sample at the model's weights, (n, P), with the model in
    eval mode (as test losses are taken)."""
    with evaluation_mode(model):
        return _per_sample_loss_gradients(model, layout, inputs, targets, loss)


def _per_sample_loss_gradients(model, layout, inputs, targets, loss):
    param = next(model.parameters())
    point = get_flat_parameters(model, layout)
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, (layout.unflatten(flat), buffers), (x[None],))
        return loss(outputs, y[None]).squeeze(0)

    x = inputs.to(param.device, param.dtype)
    y = targets.to(param.device)
    return vmap(grad(one), in_dims=(None, 0, 0))(point, x, y)


def per_sample_directional_derivatives(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    direction: torch.Tensor,
    *,
    batch_size: int = 1024,
    loss: LossFunction = cross_entropy,
) -> torch.Tensor:
    """``g_i . v`` for every given sample (n,), g_i its loss gradient at the model's weights and
    v = `direction` (P,): one forward-mode pass over the per-sample losses (a jvp) per batch,
    without forming the (n, P) per-sample gradients."""
    param = next(model.parameters())
    point = get_flat_parameters(model, layout)
    direction = direction.to(point.device, point.dtype)
    out = []
    n = int(targets.shape[0])
    for start in range(0, n, batch_size):
        x = inputs[start : start + batch_size].to(param.device, param.dtype)
        y = targets[start : start + batch_size].to(param.device)
        losses = per_sample_loss_function(model, layout, x, y, loss)
        out.append(jvp(losses, (point,), (direction,))[1].detach())
    if not out:
        return torch.zeros(0, dtype=point.dtype, device=point.device)
    return torch.cat(out)
