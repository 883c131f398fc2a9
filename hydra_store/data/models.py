"""Models: build a classifier from a model spec, and refuse layers HyDRA cannot handle.

Specs accepted by `build_model`:

- ``logreg``: Flatten + Linear(d, n_classes).
- ``mlp`` (one hidden layer of 32) or ``mlp:hidden=64,32``: Flatten, Linear + ReLU per hidden
  layer, Linear to the classes.
- ``lenet5``: LeNet-5 as in the HyDRA paper (ReLU instead of tanh, max pooling); 61,706 trainable
  parameters on 1x28x28 inputs with 10 classes.
- ``package.module:function``: ``function(input_shape=..., n_classes=...)`` returning a
  ``torch.nn.Module``.

The built-in models are ``nn.Sequential`` with named children, so parameter names
(``conv1.weight``, ``fc3.bias``, ...) are stable and readable in a store's ``layer_name``.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import torch
from torch import nn

from hydra_store.errors import InvalidArgumentError, ModelError
from hydra_store.plugins import is_plugin_spec, load_plugin_function

KNOWN_MODELS: tuple[str, ...] = ("logreg", "mlp", "lenet5")

_DEFAULT_HIDDEN = (32,)
# torch's CPU generator is process-wide: building under a fork of it is not thread-safe on its
# own, so every build takes this lock (the only lock of its kind in the package).
_GLOBAL_RNG_LOCK = threading.Lock()
_ACCEPTED_FORMS = (
    "one of " + ", ".join(KNOWN_MODELS) + "; 'mlp:hidden=64,32' (hidden layer sizes); or "
    "'package.module:function' taking input_shape and n_classes and returning a torch.nn.Module"
)


def build_model(
    spec: str,
    *,
    input_shape: tuple[int, ...],
    n_classes: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build the model named by ``spec`` for inputs of per-sample shape ``input_shape``.

    The initial weights depend only on ``seed``: the model is built under a fork of the CPU
    random number generator seeded with it, so the caller's global RNG state is left as it was
    (the fork and reseed of that process-wide generator run under one lock, so models may be
    built from several threads at once, as dask tasks do). The result is cast to
    ``dtype``, checked with `check_supported_model`, and run once on a zero batch to check that
    it maps ``input_shape`` to ``n_classes`` logits.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"the model spec must be a non-empty string; accepted: {_ACCEPTED_FORMS}")
    shape = _check_input_shape(input_shape)
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
        raise InvalidArgumentError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")

    spec = spec.strip()
    key = spec.lower()
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator: torch.manual_seed would also reseed CUDA generators,
        # which fork_rng(devices=[]) does not restore.
        torch.default_generator.manual_seed(seed)
        if key == "logreg":
            model = _logreg(shape, n_classes)
        elif key == "mlp" or key.startswith("mlp:"):
            model = _mlp(shape, n_classes, _parse_hidden(key))
        elif key == "lenet5":
            model = _lenet5(shape, n_classes)
        elif is_plugin_spec(spec):
            model = _plugin_model(spec, shape, n_classes)
        else:
            raise ModelError(f"unknown model {spec!r}; accepted: {_ACCEPTED_FORMS}")
    model = model.to(dtype=dtype)
    check_supported_model(model)
    _check_output(model, spec, shape, n_classes, dtype)
    return model


def check_supported_model(model: nn.Module) -> None:
    """Refuse models whose per-sample losses are not functions of their own sample alone.

    HyDRA needs each training sample's gradient, and replay needs the same step to give the same
    weights again. Batch normalisation makes a sample's loss depend on the rest of its batch, and
    dropout makes it random, so both are refused; so is a model with nothing to train.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model itself"
        kind = type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ModelError(
                f"{where} is {kind}, which hydra-store does not support because batch "
                "normalisation makes each sample's loss depend on the other samples of its batch "
                "(no per-sample gradients, no exact replay): remove it or use GroupNorm or "
                "LayerNorm instead"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd):
            raise ModelError(
                f"{where} is {kind}, which hydra-store does not support because dropout makes "
                "each sample's loss random (no exact replay of training): remove it"
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(
            "the model has no trainable parameters (none with requires_grad=True), so there is "
            "nothing to record: give it at least one trainable layer"
        )


def _check_input_shape(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise InvalidArgumentError(
            f"input_shape must be a tuple of positive ints, got {input_shape!r}"
        ) from None
    if not shape or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise InvalidArgumentError(f"input_shape must be a tuple of positive ints, got {shape!r}")
    return shape


def _parse_hidden(key: str) -> tuple[int, ...]:
    _, sep, rest = key.partition(":")
    if not sep:
        return _DEFAULT_HIDDEN
    option, eq, value = rest.partition("=")
    if option.strip() != "hidden" or not eq:
        raise ModelError(
            f"bad mlp option {rest!r}; write mlp:hidden=64,32 (hidden layer sizes, in order)"
        )
    try:
        sizes = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise ModelError(
            f"mlp hidden sizes must be comma-separated positive integers, got {value!r}"
        ) from None
    if not all(s > 0 for s in sizes):
        raise ModelError(f"mlp hidden sizes must be positive integers, got {value!r}")
    return sizes


def _logreg(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(flatten=nn.Flatten(), linear=nn.Linear(math.prod(shape), n_classes))
    )


def _mlp(shape: tuple[int, ...], n_classes: int, hidden: tuple[int, ...]) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = math.prod(shape)
    for k, h in enumerate(hidden, start=1):
        layers[f"fc{k}"] = nn.Linear(width, h)
        layers[f"relu{k}"] = nn.ReLU()
        width = h
    layers["out"] = nn.Linear(width, n_classes)
    return nn.Sequential(layers)


def _lenet5(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """LeNet-5 with ReLU and max pooling. The first convolution pads by 2 on images smaller than
    32x32 (28x28 MNIST-style input then gives the classic 5x5x16 feature map) and not at all on
    32x32 and larger; larger images give a larger feature map and a wider fc1."""
    if len(shape) != 3 or shape[1] < 28 or shape[2] < 28:
        raise ModelError(
            f"lenet5 needs images of at least 28x28 (input shape (C, H, W)), got input shape "
            f"{shape}; use mlp or logreg for this data"
        )
    channels, height, width = shape
    pad = 2 if min(height, width) < 32 else 0

    def out_size(n: int) -> int:
        return ((n + 2 * pad - 4) // 2 - 4) // 2

    features = 16 * out_size(height) * out_size(width)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(channels, 6, kernel_size=5, padding=pad),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, kernel_size=5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(features, 120),
            relu3=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu4=nn.ReLU(),
            fc3=nn.Linear(84, n_classes),
        )
    )


def _plugin_model(spec: str, shape: tuple[int, ...], n_classes: int) -> nn.Module:
    func = load_plugin_function(spec, what="model", error=ModelError)
    try:
        model = func(input_shape=shape, n_classes=n_classes)
    except Exception as exc:
        raise ModelError(f"model function {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model function {spec!r} must return a torch.nn.Module, it returned "
            f"{type(model).__name__}"
        )
    return model


def _check_output(
    model: nn.Module, spec: str, shape: tuple[int, ...], n_classes: int, dtype: torch.dtype
) -> None:
    """Run the model on a zero batch of two to catch shape mismatches when it is built, not in
    the middle of a recording."""
    param = next(model.parameters())
    x = torch.zeros((2, *shape), dtype=dtype, device=param.device)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelError(
            f"model {spec!r} cannot run on inputs of shape {shape}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {spec!r} must map a batch of shape (B, *{shape}) to logits of shape "
            f"(B, {n_classes}); for B=2 it gave {got}"
        )
