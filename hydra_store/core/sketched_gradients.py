"""Projected per-sample gradients without the (batch x parameters) per-sample gradients.

For a Linear or Conv2d layer, sample b's loss gradient is `G_b = sum_l delta_{b,l} a_{b,l}^T`:
the output gradient at each output position l (one for a Linear layer on a vector; every pixel
of a convolution's output; every position of every call for a layer called more than once)
times the layer's input there (for a convolution, the input patch `F.unfold` gives), with a
column of ones for the bias. One forward and one backward pass of the batch's mean loss, with
forward hooks keeping each such layer's input and output, give every a and delta at once.

Under a `TensorSketchProjector` the CountSketch of an outer product `delta a^T` is the circular
convolution of `CS_out(delta)` and `CS_in(a)` (each a length-K CountSketch of one factor), so a
layer's projected gradient is `irfft(sum_l rfft(CS_out(delta_l)) rfft(CS_in(a_l)))`: O(K log K)
per position instead of d_out x d_in. A Linear layer takes that way where `_fft_is_cheaper`
says so, and is otherwise formed and hashed directly. A convolution is always formed (by one
grouped convolution, `_conv_weight_gradients`): its per-sample gradients cost what its batch
weight gradient costs, so the backward pass skips that and the batch gradient of a
convolution's weight and bias is the sum of the per-sample ones. Every other parameter's batch
gradient is autograd's, from the same pass (the `sketched_backward` step gradient, which replay
takes the same way, `sketched_batch_gradient`). Parameters outside such layers get their
per-sample gradients from torch.func, for themselves only.

The same hook data give what a partitioned recording stores per sample: the fingerprint
`<g_b, u>` (`sum_l delta_l^T U a_l`, U the layer's block of u) and the squared norm `|g_b|^2`
(`|delta|^2 |a|^2` for one position; `sum_{l,l'} (delta_l . delta_l')(a_l . a_l')` or the formed
G_b for several).

When the hooks cannot be trusted to see every use of a layer's parameters for each sample on
its own, the step is computed in full (per-sample gradients by torch.func, the batch gradient
by a plain backward pass), never silently wrong: at every call, an input or output changed in
place after the layer, or a batch that is not the first axis; once, at the first call, a
parameter used outside its module (the sketches are compared with the full per-sample
gradients' and, if they differ, every later call is computed in full).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from hydra_store.core.gradients import PerSampleGradients
from hydra_store.core.losses import LossFunction, cross_entropy
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.projection import (
    CountSketchProjector,
    LayerHash,
    SketchedLayer,
    TensorSketchProjector,
)
from hydra_store.errors import InvalidArgumentError

LAYER_METHODS = ("auto", "direct", "fft")


@dataclass(frozen=True)
class _Binding:
    """A sketchable layer of the model: its module, where its parameters lie, and its hash
    factors when the projector structures it (None: its gradient is formed and hashed as the
    flat CountSketch has it)."""

    name: str
    module: nn.Linear | nn.Conv2d
    layer: SketchedLayer
    parameter_names: tuple[str, ...]  # the weight's, and the bias's when it is in the layer
    hash: LayerHash | None

    @property
    def conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def summed(self) -> tuple[str, ...]:
        """The parameters whose batch gradient is the sum of the per-sample ones: a
        convolution's (formed for the sketch anyway, so the backward pass skips them)."""
        return self.parameter_names if self.conv else ()


def sketchable_layers(model: nn.Module, layout: ParameterLayout) -> list[tuple[str, SketchedLayer]]:
    """The model's layers whose per-sample gradients hooks can give: modules of exactly the
    type nn.Linear or nn.Conv2d (a subclass may compute something else) with a trainable weight
    that no other module holds, and, for a convolution, one group. A bias is part of the layer
    when it is trainable and held by no other module. Everything else is left to torch.func."""
    offsets = dict(zip(layout.names, layout.offsets, strict=True))
    owners: dict[int, int] = {}  # distinct modules holding each parameter
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    found = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue
        weight, bias = module.weight, module.bias
        weight_name = names.get(id(weight))
        if weight_name not in offsets or owners[id(weight)] != 1:
            continue
        bias_offset = None
        if bias is not None and owners[id(bias)] == 1 and names.get(id(bias)) in offsets:
            bias_offset = offsets[names[id(bias)]]
        d_out = int(weight.shape[0])
        found.append(
            (name, SketchedLayer(offsets[weight_name], d_out, weight.numel() // d_out, bias_offset))
        )
    return found


def tensor_sketch_projector(
    model: nn.Module, width: int, seed: int = 0
) -> TensorSketchProjector | CountSketchProjector:
    """`record --project-dim`'s projector: a tensor sketch over the model's sketchable layers,
    or a plain CountSketch when it has none (nothing to gain from the structure)."""
    layout = ParameterLayout.from_model(model)
    layers = [layer for _, layer in sketchable_layers(model, layout)]
    if not layers:
        return CountSketchProjector(layout.n_params, width, seed=seed)
    return TensorSketchProjector(layout.n_params, width, seed=seed, layers=layers)


def _bindings(
    model: nn.Module, layout: ParameterLayout, hashes: dict[SketchedLayer, LayerHash]
) -> tuple[_Binding, ...]:
    """Every sketchable layer of the model, with its hash factors where `hashes` has them."""
    modules = dict(model.named_modules())
    names = dict(zip(layout.offsets, layout.names, strict=True))
    return tuple(
        _Binding(
            name,
            modules[name],
            layer,
            tuple(names[start] for start, _ in layer.ranges()),
            hashes.get(layer),
        )
        for name, layer in sketchable_layers(model, layout)
    )


@dataclass(frozen=True)
class SketchedStep:
    """One batch: its losses (B,), its mean gradient (P,) (the `sketched_backward` step
    gradient, `sketched_batch_gradient`), the projected per-sample gradients (B, K), and, when
    a fingerprint direction was given, each sample's `<g_b, u>` (B,) and `|g_b|^2` (B,);
    `from_hooks`: False when they were taken from full per-sample gradients."""

    losses: torch.Tensor
    mean_gradient: torch.Tensor
    projected: torch.Tensor
    fingerprints: torch.Tensor | None = None
    squared_norms: torch.Tensor | None = None
    from_hooks: bool = True

    @property
    def gradient_scale(self) -> float:
        """The root-mean-square per-sample gradient norm (`fingerprints.gradient_scale`)."""
        if self.squared_norms is None:
            raise InvalidArgumentError("no norms were computed for this step: give a direction")
        return math.sqrt(float(self.squared_norms.sum()) / max(1, self.squared_norms.shape[0]))


@dataclass(frozen=True)
class _LayerTables:
    """A sketchable layer's hash on one device: the buckets and signs of its weight and bias
    entries (as the flat CountSketch has them), and its two factors (None for a layer the
    projector does not structure)."""

    buckets: tuple[torch.Tensor, ...]
    signs: tuple[torch.Tensor, ...]
    h_out: torch.Tensor | None
    s_out: torch.Tensor | None
    h_in: torch.Tensor | None
    s_in: torch.Tensor | None


@dataclass(frozen=True)
class _Tables:
    layers: tuple[_LayerTables, ...]
    fallback_index: torch.Tensor
    fallback_bucket: torch.Tensor
    fallback_sign: torch.Tensor


@dataclass
class _Call:
    inputs: torch.Tensor
    output: torch.Tensor
    versions: tuple[int, int]


class SketchedGradients:
    """The projected per-sample gradients of a batch under a `TensorSketchProjector`, from one
    forward and one backward pass (see the module docstring).

    The batch's mean gradient comes from the same pass: a convolution's weight gradient is the
    sum of its per-sample gradients, formed for the sketch anyway (so the backward pass skips
    it: on LeNet-5 that is most of the sketch's cost), every other parameter's is autograd's.
    Replay takes the same gradient (`sketched_batch_gradient`, step gradient
    `sketched_backward`).

    Args:
        model: the network; its parameters are read at every call.
        layout: the model's parameter layout (the projector's flat order).
        projector: a tensor sketch whose layers are sketchable layers of this model.
        layer_method: "auto" (a Linear layer by `_fft_is_cheaper`, a convolution formed), or
            "direct" / "fft" for every layer (to test and measure both).
        loss: the per-sample training loss (core/losses.py; default cross-entropy).

    `hooks_exact`: None until the first call whose hooks are usable has compared its sketches
    with the full per-sample gradients' (a parameter used outside its module shows there);
    False after a mismatch: from then on every call takes full per-sample gradients and the
    backward pass's mean (the `batch_backward` step gradient).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParameterLayout,
        projector: TensorSketchProjector,
        *,
        layer_method: str = "auto",
        loss: LossFunction = cross_entropy,
    ) -> None:
        if layer_method not in LAYER_METHODS:
            raise InvalidArgumentError(
                f"layer_method must be one of {', '.join(LAYER_METHODS)}, got {layer_method!r}"
            )
        if projector.n_params != layout.n_params:
            raise InvalidArgumentError(
                f"the projector maps {projector.n_params} parameters; the model has "
                f"{layout.n_params}"
            )
        self.model, self.layout, self.projector = model, layout, projector
        self.layer_method, self.loss = layer_method, loss
        hashes = dict(zip(projector.layers, projector.hashes, strict=True))
        self.bindings = _bindings(model, layout, hashes)
        unknown = set(hashes) - {b.layer for b in self.bindings}
        if unknown:
            raise InvalidArgumentError(
                f"the projector's sketched layer {sorted(unknown, key=str)[0]} is no Linear or "
                "Conv2d layer of this model: build the projector from the model "
                "(tensor_sketch_projector)"
            )
        covered = {start for b in self.bindings for start, _ in b.layer.ranges()}
        self.fallback_names = tuple(
            n for n, o in zip(layout.names, layout.offsets, strict=True) if o not in covered
        )
        sizes = dict(zip(layout.names, layout.sizes, strict=True))
        offsets = dict(zip(layout.names, layout.offsets, strict=True))
        self._fallback_index = torch.cat(
            [torch.arange(offsets[n], offsets[n] + sizes[n]) for n in self.fallback_names]
            or [torch.zeros(0, dtype=torch.long)]
        )
        self._full = PerSampleGradients(model, layout, loss)
        self._table_cache: dict[tuple[torch.device, torch.dtype], _Tables] = {}
        self.hooks_exact: bool | None = None

    # -- the step ----------------------------------------------------------------------------
    def __call__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        direction: torch.Tensor | None = None,
    ) -> SketchedStep:
        """One batch; with `direction` (the fingerprints' unit vector u, (P,)) also each
        sample's fingerprint and squared gradient norm."""
        batch = int(inputs.shape[0])
        losses, calls = _hooked_forward(self.model, self.bindings, inputs, targets, self.loss)
        usable = self.hooks_exact is not False and _usable(self.bindings, calls, batch)
        verifying = usable and self.hooks_exact is None
        loss = losses.mean()
        named = dict(self.model.named_parameters())
        grads, deltas = _backward(
            named, self.layout, self.bindings, calls, loss, usable, retain=verifying
        )
        with torch.no_grad():
            if usable:
                projected, fingerprints, norms, sums = self._sketch(
                    inputs, targets, batch, calls, deltas, direction
                )
                grads.update(sums)
                if verifying:
                    self.hooks_exact = self._agrees_with_full(inputs, targets, projected)
                summed = [n for b in self.bindings for n in b.summed]
                if not self.hooks_exact and summed:
                    # The sums are not the batch gradient either: take it from the graph kept.
                    again = torch.autograd.grad(loss, [named[n] for n in summed], allow_unused=True)
                    grads.update(zip(summed, again, strict=True))
            if not (usable and self.hooks_exact):
                projected, fingerprints, norms = self._sketch_full(inputs, targets, direction)
        mean = _flat(named, self.layout, grads)
        from_hooks = bool(usable and self.hooks_exact)
        return SketchedStep(losses.detach(), mean, projected, fingerprints, norms, from_hooks)

    def _tables(self, device: torch.device, dtype: torch.dtype) -> _Tables:
        """The projector's hash on this device, signs in this dtype (built once)."""
        key = (device, dtype)
        if key not in self._table_cache:
            bucket = self.projector.bucket.to(device)
            sign = self.projector.sign.to(device, dtype)
            layers = []
            for binding in self.bindings:
                ranges = binding.layer.ranges()
                h = binding.hash
                layers.append(
                    _LayerTables(
                        tuple(bucket[a:b] for a, b in ranges),
                        tuple(sign[a:b] for a, b in ranges),
                        None if h is None else h.h_out.to(device),
                        None if h is None else h.s_out.to(device, dtype),
                        None if h is None else h.h_in.to(device),
                        None if h is None else h.s_in.to(device, dtype),
                    )
                )
            index = self._fallback_index.to(device)
            self._table_cache[key] = _Tables(tuple(layers), index, bucket[index], sign[index])
        return self._table_cache[key]

    def _sketch(self, inputs, targets, batch, calls, deltas, direction):
        """(projected (B, K), fingerprints, squared norms, the convolutions' summed weight
        gradients by name) from the hooks, and torch.func for the fallback parameters."""
        dtype, device = inputs.dtype, inputs.device
        tables = self._tables(device, dtype)
        width = self.projector.width
        projected = torch.zeros(batch, width, dtype=dtype, device=device)
        want = direction is not None
        u = direction.to(device, dtype) if want else None
        fingerprints = torch.zeros(batch, dtype=dtype, device=device) if want else None
        norms = torch.zeros(batch, dtype=dtype, device=device) if want else None
        outs: list[torch.Tensor] = []  # the factors' sketches of the layers taken by FFT
        ins: list[torch.Tensor] = []
        sums: dict[str, torch.Tensor] = {}
        for binding, table, layer_calls, layer_deltas in zip(
            self.bindings, tables.layers, calls, deltas, strict=True
        ):
            parts = _parts(layer_calls, layer_deltas)
            factors, formed = self._sketch_layer(
                binding, table, parts, projected, u, fingerprints, norms
            )
            sums.update(_summed(binding, formed))
            if factors is not None:
                outs.append(factors[0])
                ins.append(factors[1])
        if outs:
            # sum over layers and positions of CS_out (*) CS_in: the product of their spectra,
            # summed before one inverse FFT (one forward FFT for all of them).
            spectra = torch.fft.rfft(torch.cat(outs + ins, 1), dim=-1)
            half = spectra.shape[1] // 2
            product = (spectra[:, :half] * spectra[:, half:]).sum(1)
            projected += torch.fft.irfft(product, n=width, dim=-1)
        # The hooks saw the gradients of the batch's mean loss: B times smaller than each
        # sample's own.
        projected *= batch
        if want:
            fingerprints *= batch
            norms *= batch * batch
        if tables.fallback_index.numel():
            g = self._fallback_gradients(inputs, targets)
            projected.index_add_(1, tables.fallback_bucket, g * tables.fallback_sign)
            if want:
                fingerprints += g @ u[tables.fallback_index]
                norms += (g * g).sum(1)
        return projected, fingerprints, norms, sums

    def _sketch_layer(
        self, binding, table, parts, projected, u, fingerprints, norms
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, ...] | None]:
        """Add one layer's share to `projected` (formed directly) or return its factors'
        sketches (CS_out(delta), CS_in([a, 1])), each (B, L, K), for the FFT; add its share of
        the fingerprints and norms; and return its per-sample gradients when formed (always
        for a convolution: its mean gradient is their sum)."""
        if not parts:
            return None, None
        layer, module = binding.layer, binding.module
        has_bias = layer.bias_offset is not None
        positions = sum(delta[0].numel() // layer.d_out for _, delta in parts)
        if binding.hash is None:
            fft = False
        elif self.layer_method != "auto":
            fft = self.layer_method == "fft"
        else:
            fft = not binding.conv and _fft_is_cheaper(
                layer.d_out, layer.d_in + has_bias, positions, projected.shape[1]
            )
        formed = None
        if (
            not fft
            or binding.conv
            or (norms is not None and positions > 1 and not _gram_is_cheaper(layer, positions))
        ):
            formed = _layer_gradient(module, parts, has_bias)
        factors = None
        if fft:
            a, delta = _factors(module, parts)
            factors = _factor_sketches(table, a, delta, has_bias, projected.shape[1])
        else:
            for bucket, sign, g in zip(table.buckets, table.signs, formed, strict=True):
                projected.index_add_(1, bucket, g.reshape(g.shape[0], -1) * sign)
        if u is None:
            return factors, formed
        if formed is not None:
            for (start, stop), g in zip(layer.ranges(), formed, strict=True):
                flat = g.reshape(g.shape[0], -1)
                fingerprints += flat @ u[start:stop]
                norms += (flat * flat).sum(1)
            return factors, formed
        start, stop = layer.ranges()[0]
        weight_u = u[start:stop].view(layer.d_out, layer.d_in)
        fingerprints += ((a @ weight_u.T) * delta).sum((1, 2))
        if has_bias:
            start, stop = layer.ranges()[1]
            fingerprints += delta.sum(1) @ u[start:stop]
        if positions == 1:
            a_squared = (a * a).sum((1, 2)) + has_bias
            norms += (delta * delta).sum((1, 2)) * a_squared
        else:
            a_gram = a @ a.transpose(1, 2)
            if has_bias:
                a_gram += 1
            norms += ((delta @ delta.transpose(1, 2)) * a_gram).sum((1, 2))
        return factors, formed

    def _fallback_gradients(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients (B, P_fallback) of the parameters outside sketched layers."""
        fixed = {n: p.detach() for n, p in self.model.named_parameters()}
        buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        free = {n: fixed[n] for n in self.fallback_names}
        model = self.model

        def sample_loss(free_params, x, y):
            outputs = functional_call(model, ({**fixed, **free_params}, buffers), (x[None],))
            return self.loss(outputs, y[None]).squeeze(0)

        grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(free, inputs, targets)
        batch = int(inputs.shape[0])
        return torch.cat([grads[n].reshape(batch, -1) for n in self.fallback_names], 1)

    def _sketch_full(self, inputs, targets, direction):
        """The same three from full per-sample gradients (B, P)."""
        gradients = self._full(inputs, targets)[1]
        projected = self.projector.project(gradients)
        if direction is None:
            return projected, None, None
        u = direction.to(gradients.device, gradients.dtype)
        return projected, gradients @ u, (gradients * gradients).sum(1)

    def _agrees_with_full(self, inputs, targets, projected: torch.Tensor) -> bool:
        """Whether the hooks' sketches are those of the full per-sample gradients (checked once:
        a parameter used outside its module, or a batch on another axis, shows here)."""
        expected = self._sketch_full(inputs, targets, None)[0]
        scale = float(expected.abs().max())
        tolerance = torch.finfo(expected.dtype).eps ** 0.5 * max(scale, 1e-30)
        return bool((projected - expected).abs().max() <= tolerance)


def sketched_batch_gradient(
    model: nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction = cross_entropy,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample losses, the batch's mean gradient as (1, P)) as a `SketchedGradients` step
    takes it, bit for bit (the `sketched_backward` step gradient, what replay takes): one
    backward pass, each convolution's weight gradient summed from its per-sample gradients."""
    bindings = _bindings(model, layout, {})
    losses, calls = _hooked_forward(model, bindings, inputs, targets, loss)
    usable = _usable(bindings, calls, int(inputs.shape[0]))
    named = dict(model.named_parameters())
    grads, deltas = _backward(named, layout, bindings, calls, losses.mean(), usable, retain=False)
    if usable:
        with torch.no_grad():
            for binding, layer_calls, layer_deltas in zip(bindings, calls, deltas, strict=True):
                if binding.summed:
                    parts = _parts(layer_calls, layer_deltas)
                    has_bias = binding.layer.bias_offset is not None
                    formed = _layer_gradient(binding.module, parts, has_bias) if parts else None
                    grads.update(_summed(binding, formed))
    return losses.detach(), _flat(named, layout, grads)[None]


def _hooked_forward(
    model: nn.Module,
    bindings: Sequence[_Binding],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: LossFunction,
) -> tuple[torch.Tensor, list[list[_Call]]]:
    """The per-sample losses, with each sketchable layer's calls (input, output) kept."""
    calls: list[list[_Call]] = [[] for _ in bindings]

    def keeper(kept: list[_Call]):
        def keep(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("input")
            if isinstance(output, torch.Tensor) and output.requires_grad:
                kept.append(_Call(x, output, (_version(x), output._version)))

        return keep

    handles = [
        b.module.register_forward_hook(keeper(kept), with_kwargs=True)
        for b, kept in zip(bindings, calls, strict=True)
    ]
    try:
        losses = loss(model(inputs), targets)
    finally:
        for handle in handles:
            handle.remove()
    return losses, calls


def _usable(bindings: Sequence[_Binding], calls: Sequence[Sequence[_Call]], batch: int) -> bool:
    """Whether every kept call is each sample's own: a batched tensor input whose first axis is
    the batch (as is the output's), neither changed in place after the layer."""
    for binding, layer_calls in zip(bindings, calls, strict=True):
        for call in layer_calls:
            x, out = call.inputs, call.output
            if not isinstance(x, torch.Tensor) or (x._version, out._version) != call.versions:
                return False
            if (binding.conv and x.dim() != 4) or x.dim() < 2:
                return False
            if x.shape[0] != batch or out.shape[0] != batch:
                return False
    return True


def _backward(
    named: dict[str, nn.Parameter],
    layout: ParameterLayout,
    bindings: Sequence[_Binding],
    calls: Sequence[Sequence[_Call]],
    loss: torch.Tensor,
    sum_convolutions: bool,
    *,
    retain: bool,
) -> tuple[dict[str, torch.Tensor | None], list[list[torch.Tensor | None]]]:
    """One backward pass: the parameters' gradients by name (without the convolutions'
    weights when `sum_convolutions`: those are summed from the per-sample gradients) and the
    output gradient of each kept call."""
    skipped = {n for b in bindings for n in b.summed} if sum_convolutions else set()
    names = [n for n in layout.names if n not in skipped]
    outputs = [call.output for layer_calls in calls for call in layer_calls]
    grads = torch.autograd.grad(
        loss, [named[n] for n in names] + outputs, allow_unused=True, retain_graph=retain
    )
    output_grads = iter(grads[len(names) :])
    deltas = [[next(output_grads) for _ in layer_calls] for layer_calls in calls]
    return dict(zip(names, grads[: len(names)], strict=True)), deltas


def _parts(
    layer_calls: Sequence[_Call], layer_deltas: Sequence[torch.Tensor | None]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input, output gradient) of each call that reached the loss."""
    return [
        (call.inputs, delta)
        for call, delta in zip(layer_calls, layer_deltas, strict=True)
        if delta is not None
    ]


def _summed(binding: _Binding, formed: tuple[torch.Tensor, ...] | None) -> dict[str, torch.Tensor]:
    """A convolution's batch weight (and bias) gradient: the sums of its per-sample ones."""
    if not binding.summed:
        return {}
    parameters = (binding.module.weight, binding.module.bias)[: len(binding.summed)]
    if formed is None:
        return {n: torch.zeros_like(p) for n, p in zip(binding.summed, parameters, strict=True)}
    return {
        n: g.sum(0).reshape(p.shape)
        for n, p, g in zip(binding.summed, parameters, formed, strict=True)
    }


def _flat(
    named: dict[str, nn.Parameter],
    layout: ParameterLayout,
    grads: dict[str, torch.Tensor | None],
) -> torch.Tensor:
    """The gradients as one flat vector in the layout's order (zeros where none reached)."""
    return torch.cat(
        [
            torch.zeros_like(named[n]).reshape(-1) if grads.get(n) is None else grads[n].reshape(-1)
            for n in layout.names
        ]
    )


def _version(x) -> int:
    return x._version if isinstance(x, torch.Tensor) else -1


def _padded(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | int]:
    """The convolution's input and the zero padding left to the convolution itself: a padding
    given as a string, or other than zeros, is applied here."""
    padding = module.padding
    if module.padding_mode == "zeros" and not isinstance(padding, str):
        return x, padding
    pads: list[int] = []
    for k, d, p in zip(
        reversed(module.kernel_size),
        reversed(module.dilation),
        (None, None) if isinstance(padding, str) else reversed(padding),
        strict=True,
    ):
        if padding == "valid":
            pads += [0, 0]
        elif padding == "same":
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [p, p]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode), 0


def _factors(
    module: nn.Module, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's inputs a (B, L, d_in) and output gradients delta (B, L, d_out) at all
    positions of all its calls (a convolution's input patches with its own padding, stride and
    dilation, in the order of its weight's (C_in, kh, kw))."""
    a_parts, delta_parts = [], []
    for x, delta in parts:
        batch = x.shape[0]
        if isinstance(module, nn.Conv2d):
            x, padding = _padded(module, x)
            patches = F.unfold(
                x,
                module.kernel_size,
                dilation=module.dilation,
                padding=padding,
                stride=module.stride,
            )
            a_parts.append(patches.transpose(1, 2))
            delta_parts.append(delta.reshape(batch, delta.shape[1], -1).transpose(1, 2))
        else:
            a_parts.append(x.reshape(batch, -1, x.shape[-1]))
            delta_parts.append(delta.reshape(batch, -1, delta.shape[-1]))
    if len(a_parts) == 1:
        return a_parts[0], delta_parts[0]
    return torch.cat(a_parts, 1), torch.cat(delta_parts, 1)


def _layer_gradient(
    module: nn.Module, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], has_bias: bool
) -> tuple[torch.Tensor, ...]:
    """Each sample's weight gradient (B, d_out, d_in) and bias gradient (B, d_out), summed over
    the layer's calls."""
    weight, bias = None, None
    for x, delta in parts:
        batch, d_out = x.shape[0], delta.shape[1 if isinstance(module, nn.Conv2d) else -1]
        if isinstance(module, nn.Conv2d):
            w = _conv_weight_gradients(module, x, delta)
            b = delta.sum((2, 3)) if has_bias else None
        else:
            a = x.reshape(batch, -1, x.shape[-1])
            flat_delta = delta.reshape(batch, -1, d_out)
            w = torch.einsum("blo,bli->boi", flat_delta, a)
            b = flat_delta.sum(1) if has_bias else None
        weight = w if weight is None else weight + w
        if has_bias:
            bias = b if bias is None else bias + b
    return (weight, bias) if has_bias else (weight,)


def _conv_weight_gradients(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Each sample's weight gradient (B, C_out, C_in kh kw) of a convolution: the correlation of
    its input with its output gradient, as one convolution whose batch is the input channels,
    whose groups are the samples and whose kernels are the output gradients (the layer's stride
    becomes the dilation and its dilation the stride). Measured on LeNet-5's layers faster than
    the batch-grouped weight gradient (`torch.nn.grad.conv2d_weight`) and than unfolding the
    input and multiplying (0.76 against 1.25 and 4.4 ms for the first, batch 64, 2 cores)."""
    x, padding = _padded(module, x)
    batch, channels = x.shape[:2]
    d_out = delta.shape[1]
    kh, kw = module.kernel_size
    out = F.conv2d(
        x.transpose(0, 1),
        delta.reshape(batch * d_out, 1, *delta.shape[2:]),
        stride=module.dilation,
        padding=padding,
        dilation=module.stride,
        groups=batch,
    )[..., :kh, :kw]
    return (
        out.reshape(channels, batch, d_out, kh * kw).permute(1, 2, 0, 3).reshape(batch, d_out, -1)
    )


def _count_sketch(x: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, width: int):
    """CountSketch along the last axis: (..., d) -> (..., width)."""
    out = torch.zeros(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    return out.index_add_(x.dim() - 1, bucket, x * sign)


def _factor_sketches(
    table: _LayerTables, a: torch.Tensor, delta: torch.Tensor, has_bias: bool, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CS_out(delta_l) and CS_in([a_l, 1]) at every position, each (B, L, width): under the
    tensor sketch, the layer's projected gradient is the sum over l of their circular
    convolutions."""
    d_in = a.shape[-1]
    sketch_in = _count_sketch(a, table.h_in[:d_in], table.s_in[:d_in], width)
    if has_bias:
        sketch_in[..., table.h_in[d_in]] += table.s_in[d_in]
    return _count_sketch(delta, table.h_out, table.s_out, width), sketch_in


def _fft_is_cheaper(d_out: int, d_in: int, positions: int, width: int) -> bool:
    """Rough operation counts per sample: forming the layer's gradient (d_out d_in
    multiply-adds per position, then hashing its d_out d_in entries) against sketching both
    factors at each position and three FFTs' worth of length K per position."""
    direct = d_out * d_in * (positions + 4)
    fft = positions * (d_out + d_in) * 4 + (2 * positions + 1) * width * max(1.0, math.log2(width))
    return fft < direct


def _gram_is_cheaper(layer: SketchedLayer, positions: int) -> bool:
    """|G_b|^2 by the positions' Gram matrices (L^2 (d_out + d_in)) against forming G_b
    (L d_out d_in)."""
    return positions * (layer.d_out + layer.d_in + 1) < layer.d_out * (layer.d_in + 1)
