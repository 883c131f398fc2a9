"""Sketched per-sample gradients: from one forward and backward pass with hooks, each sample's
tensor-sketched gradient, the batch's mean gradient, the fingerprints and the gradient scale
equal those of the full per-sample gradients (torch.func), in float64 to 1e-10, on an MLP,
LeNet-5, convolutions with stride, padding and dilation, a reused layer and layers left to
torch.func; replay's step gradient is the recorder's to the bit; and models the hooks cannot see
are computed in full, never wrong."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hydra_store.core.fingerprints import (
    fingerprint_direction,
    gradient_fingerprints,
    gradient_scale,
)
from hydra_store.core.gradients import PerSampleGradients, batch_gradient, step_gradients
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.projection import CountSketchProjector, TensorSketchProjector
from hydra_store.core.sketched_gradients import (
    SketchedGradients,
    _fft_is_cheaper,
    sketchable_layers,
    sketched_batch_gradient,
    tensor_sketch_projector,
)
from hydra_store.data.models import build_model
from hydra_store.errors import InvalidArgumentError


class Convolutions(nn.Module):
    """Strided, padded and dilated convolutions ('same' with reflection too, no bias), a Linear
    layer on channels-last features called twice, and layers the hooks leave to torch.func: a
    LayerNorm and a free scale."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(3, 4, 3, padding=(2, 1), dilation=(2, 1))
        self.same = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.out = nn.Linear(4 * 16, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.strided(x))  # (B, 3, 4, 4)
        h = torch.relu(self.dilated(h))  # (B, 4, 4, 4)
        h = torch.tanh(self.same(h)).permute(0, 2, 3, 1)  # (B, 4, 4, 4), channels last
        h = self.mix(torch.tanh(self.mix(self.norm(h))))
        return self.out(h.flatten(1)) * self.scale


class OutsideItsModule(nn.Module):
    """A Linear layer whose weight is also used outside the layer's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.hidden(x.flatten(1)))
        return self.out(h) + h @ self.out.weight.T


class ConvolutionOutsideItsModule(nn.Module):
    """A convolution whose weight is also used outside the layer's own call (the batch
    gradient of a convolution's weight is summed from its per-sample gradients: not here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.out = nn.Linear(2 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.out(torch.relu(self.conv(x)).flatten(1))
        extra = F.conv2d(x, self.conv.weight).mean((1, 2, 3))[:, None]
        return torch.cat([logits[:, :1] + extra, logits[:, 1:]], 1)


class InPlace(nn.Module):
    """A Linear layer's output changed in place after the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(64, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu_(self.hidden(x.flatten(1))))


def _case(name: str):
    """(model, inputs, targets, width) in float64."""
    generator = torch.Generator().manual_seed(0)
    if name == "mlp":
        model = build_model("mlp:hidden=16,8", input_shape=(1, 8, 8), n_classes=10, seed=1)
        shape, classes, width = (1, 8, 8), 10, 64
    elif name == "lenet5":
        model = build_model("lenet5", input_shape=(1, 28, 28), n_classes=10, seed=1)
        shape, classes, width = (1, 28, 28), 10, 256
    elif name == "convolutions":
        torch.manual_seed(1)
        model = Convolutions()
        shape, classes, width = (2, 8, 8), 5, 64
    else:
        torch.manual_seed(1)
        model = {
            "outside": OutsideItsModule,
            "conv-outside": ConvolutionOutsideItsModule,
            "in-place": InPlace,
        }[name]()
        shape, classes, width = (1, 8, 8), 5, 32
    inputs = torch.randn(5, *shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (5,), generator=generator)
    return model.double(), inputs, targets, width


def _full(model, inputs, targets):
    layout = ParameterLayout.from_model(model)
    return PerSampleGradients(model, layout)(inputs, targets)[1].clone()


def _assert_relative(got: torch.Tensor, want: torch.Tensor, tolerance: float = 1e-10) -> None:
    scale = float(want.abs().max())
    assert scale > 0
    assert float((got - want).abs().max()) <= tolerance * scale


@pytest.mark.parametrize("method", ["auto", "direct", "fft"])
@pytest.mark.parametrize("name", ["mlp", "lenet5", "convolutions"])
def test_sketched_gradients_equal_the_full_ones_projected(name, method):
    model, inputs, targets, width = _case(name)
    layout = ParameterLayout.from_model(model)
    projector = tensor_sketch_projector(model, width, seed=2)
    sketched = SketchedGradients(model, layout, projector, layer_method=method)
    direction = fingerprint_direction(layout.n_params, seed=3)
    step = sketched(inputs, targets, direction)
    assert sketched.hooks_exact and step.from_hooks
    full = _full(model, inputs, targets)
    _assert_relative(step.projected, projector.project(full))
    # The batch's mean gradient: replay's (`sketched_backward`) to the bit, one plain backward
    # pass's and the mean of the per-sample gradients to rounding.
    losses, mean = sketched_batch_gradient(model, layout, inputs, targets)
    torch.testing.assert_close(step.mean_gradient, mean[0], rtol=0, atol=0)
    torch.testing.assert_close(step.losses, losses, rtol=0, atol=0)
    replayed = step_gradients(model, layout, None, inputs, targets, "sketched_backward")[1]
    torch.testing.assert_close(replayed, mean, rtol=0, atol=0)
    _assert_relative(step.mean_gradient, batch_gradient(model, layout, inputs, targets)[1][0])
    _assert_relative(step.mean_gradient, full.mean(0), 1e-12)
    np.testing.assert_allclose(
        step.fingerprints.numpy(), gradient_fingerprints(full, direction), rtol=1e-10, atol=0
    )
    assert math.isclose(step.gradient_scale, gradient_scale(full), rel_tol=1e-10)
    # The next call, without a direction: the same sketches, no fingerprints.
    again = sketched(inputs, targets)
    torch.testing.assert_close(again.projected, step.projected, rtol=1e-12, atol=0)
    assert again.fingerprints is None and again.squared_norms is None


def test_the_layers_left_to_torch_func_and_the_reused_layer():
    model, _, _, _ = _case("convolutions")
    layout = ParameterLayout.from_model(model)
    names = [name for name, _ in sketchable_layers(model, layout)]
    assert names == ["strided", "dilated", "same", "mix", "out"]
    projector = tensor_sketch_projector(model, 64)
    assert SketchedGradients(model, layout, projector).fallback_names == (
        "scale",
        "norm.weight",
        "norm.bias",
    )


@pytest.mark.parametrize("name", ["outside", "conv-outside", "in-place"])
def test_models_the_hooks_cannot_see_are_computed_in_full(name):
    """A weight used outside its layer (found by the first call's check against the full
    gradients: the whole run is then computed in full) and an output changed in place (found
    at each call before the backward pass): the sketches come from full per-sample gradients,
    the mean gradient from one plain backward pass, still exact."""
    model, inputs, targets, width = _case(name)
    layout = ParameterLayout.from_model(model)
    projector = tensor_sketch_projector(model, width)
    sketched = SketchedGradients(model, layout, projector)
    direction = fingerprint_direction(layout.n_params, seed=3)
    step = sketched(inputs, targets, direction)
    assert not step.from_hooks
    assert sketched.hooks_exact is (None if name == "in-place" else False)
    full = _full(model, inputs, targets)
    _assert_relative(step.projected, projector.project(full))
    np.testing.assert_allclose(
        step.fingerprints.numpy(), gradient_fingerprints(full, direction), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(
        step.mean_gradient, batch_gradient(model, layout, inputs, targets)[1][0], rtol=0, atol=0
    )


def test_which_layers_are_sketched():
    """Exactly nn.Linear and ungrouped nn.Conv2d, each holding its own weight; a model with none
    gets a plain CountSketch."""

    class Subclassed(nn.Linear):
        pass

    tied = nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2),
        nn.Flatten(),
        Subclassed(4, 4),
        tied,
        nn.Linear(4, 4),
    )
    model[4].weight = tied.weight
    layout = ParameterLayout.from_model(model)
    assert sketchable_layers(model, layout) == []
    projector = tensor_sketch_projector(model, 8)
    assert isinstance(projector, CountSketchProjector)
    frozen = build_model("mlp:hidden=4", input_shape=(1, 8, 8), n_classes=10)
    frozen.fc1.bias.requires_grad_(False)  # layout: fc1.weight (256), out.weight (40), out.bias
    layers = sketchable_layers(frozen, ParameterLayout.from_model(frozen))
    assert [(name, layer.bias_offset) for name, layer in layers] == [("fc1", None), ("out", 296)]


def test_a_projector_of_another_model_or_method_is_refused():
    model = build_model("mlp:hidden=4", input_shape=(1, 8, 8), n_classes=10)
    layout = ParameterLayout.from_model(model)
    other = build_model("mlp:hidden=2,2", input_shape=(1, 8, 8), n_classes=10)
    wrong = TensorSketchProjector(
        layout.n_params, 16, layers=tensor_sketch_projector(other, 16).layers[:1]
    )
    with pytest.raises(InvalidArgumentError, match="no Linear or Conv2d layer of this model"):
        SketchedGradients(model, layout, wrong)
    with pytest.raises(InvalidArgumentError, match="layer_method"):
        SketchedGradients(model, layout, tensor_sketch_projector(model, 16), layer_method="x")


def test_lenet5_convolves_its_large_linear_layers_and_forms_the_small_one():
    """The cost rule at K = 1,024 and LeNet-5's Linear sizes (d_out, d_in + bias, positions);
    convolutions are always formed (their batch weight gradient is the per-sample sum)."""
    assert _fft_is_cheaper(120, 401, 1, 1024)  # fc1
    assert _fft_is_cheaper(84, 121, 1, 1024)  # fc2
    assert not _fft_is_cheaper(10, 85, 1, 1024)  # fc3
