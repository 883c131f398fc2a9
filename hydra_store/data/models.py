"""Models: build a classifier from a model spec, and refuse layers HyDRA cannot handle.

Specs accepted by `build_model`:

- ``logreg``: Flatten + Linear(d, n_classes).
- ``mlp`` (one hidden layer of 32) or ``mlp:hidden=64,32``: Flatten, Linear + ReLU per hidden
  layer, Linear to the classes.
- ``lenet5``: LeNet-5 as in the HyDRA paper (ReLU instead of tanh, max pooling); 61,706 trainable
  parameters on 1x28x28 inputs with 10 classes.
- ``bncnn``: a small CNN with BatchNorm and dropout (two 3x3 convolutions of 16 and 32
  channels, each with BatchNorm, ReLU and 2x2 max pooling; dropout 0.25; global average
  pooling; a linear layer): 5,514 parameters on 3x32x32 with 10 classes, for tests and CPU
  studies of batch-coupled recordings.
- ``densenet40``: DenseNet-BC of depth 40, growth rate 12 (bottleneck layers, compression 0.5),
  the CIFAR variant; 176,122 parameters on 3x32x32 with 10 classes, as in the HyDRA paper.
- ``mobilenetv2``: MobileNetV2 (inverted residuals, ReLU6) with a stride-1 stem for 32x32
  inputs; 2,236,682 parameters on 3x32x32 with 10 classes, as in the HyDRA paper.
- ``resnet18``: ResNet-18 with a 3x3 stride-1 stem and no max pooling (the CIFAR variant);
  11,173,962 parameters on 3x32x32 with 10 classes.
- ``package.module:function``: ``function(input_shape=..., n_classes=...)`` returning a
  ``torch.nn.Module``.

The built-in models are ``nn.Sequential`` with named children, so parameter names
(``conv1.weight``, ``fc3.bias``, ...) are stable and readable in a store's ``layer_name``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from hydra_store.errors import InvalidArgumentError, ModelError
from hydra_store.plugins import is_plugin_spec, load_plugin_function
from hydra_store.rng import GLOBAL_RNG_LOCK

KNOWN_MODELS: tuple[str, ...] = (
    "logreg",
    "mlp",
    "lenet5",
    "bncnn",
    "densenet40",
    "mobilenetv2",
    "resnet18",
)

_DEFAULT_HIDDEN = (32,)
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
    # torch's CPU generator is process-wide: a build under a fork of it takes its lock.
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        # Seed only the CPU generator: torch.manual_seed would also reseed CUDA generators,
        # which fork_rng(devices=[]) does not restore.
        torch.default_generator.manual_seed(seed)
        if key == "logreg":
            model = _logreg(shape, n_classes)
        elif key == "mlp" or key.startswith("mlp:"):
            model = _mlp(shape, n_classes, _parse_hidden(key))
        elif key == "lenet5":
            model = _lenet5(shape, n_classes)
        elif key in _CIFAR_MODELS:
            model = _CIFAR_MODELS[key](_image_shape(key, shape), n_classes)
        elif is_plugin_spec(spec):
            model = _plugin_model(spec, shape, n_classes)
        else:
            raise ModelError(f"unknown model {spec!r}; accepted: {_ACCEPTED_FORMS}")
    model = model.to(dtype=dtype)
    check_supported_model(model)
    _check_output(model, spec, shape, n_classes, dtype)
    return model


def check_supported_model(model: nn.Module) -> None:
    """Refuse models whose training steps hydra-store cannot reproduce or differentiate.

    HyDRA needs each training sample's gradient, and replay needs the same step to give the same
    weights again. Supported: BatchNorm (1d/2d/3d, tracking running statistics; a sample's
    gradient is then that of the weighted batch loss, coupled through the batch statistics) and
    dropout (masks drawn from a seed stored per step); see core/model_state.py. Refused, with
    the reason: layers that couple samples in other ways or keep hidden random state, and a
    model with nothing to train.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        where = f"layer {name!r}" if name else "the model itself"
        reason = _unsupported(module)
        if reason is not None:
            raise ModelError(
                f"{where} is {type(module).__name__}, which hydra-store does not support: {reason}"
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(
            "the model has no trainable parameters (none with requires_grad=True), so there is "
            "nothing to record: give it at least one trainable layer"
        )


def _unsupported(module: nn.Module) -> str | None:
    """Why a layer is refused, or None."""
    if isinstance(module, nn.SyncBatchNorm):
        return (
            "its statistics are gathered across processes, which a recording of one process "
            "cannot replay; use BatchNorm2d"
        )
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "its parameters are not initialised yet; run the model once before recording"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
        return (
            "without running statistics it normalises test samples by the statistics of their "
            "own batch, so a test loss depends on the other test samples; keep "
            "track_running_stats=True"
        )
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
        return "its running statistics are not recorded; use track_running_stats=False"
    if isinstance(module, nn.RReLU):
        return "its random slopes in training are not replayed; use LeakyReLU"
    if isinstance(module, nn.RNNBase) and module.dropout > 0:
        return (
            "its internal dropout is not replayed; set dropout=0 and use nn.Dropout between layers"
        )
    return None


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


def _image_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) != 3 or shape[1] < 8 or shape[2] < 8:
        raise ModelError(
            f"{name} needs images (C, H, W) of at least 8x8 (it is built for 3x32x32), got input "
            f"shape {shape}; use mlp or logreg for this data"
        )
    return shape


class _DenseLayer(nn.Module):
    """DenseNet-BC layer: BN-ReLU-conv1x1 (4k channels), BN-ReLU-conv3x3 (k), concatenated."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)


def _densenet40(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    depth, growth = 40, 12
    per_block = (depth - 4) // 6
    channels = 2 * growth
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv0=nn.Conv2d(shape[0], channels, 3, padding=1, bias=False)
    )
    for block in range(1, 4):
        for k in range(1, per_block + 1):
            layers[f"block{block}_layer{k}"] = _DenseLayer(channels, growth)
            channels += growth
        if block < 3:
            layers[f"transition{block}_bn"] = nn.BatchNorm2d(channels)
            layers[f"transition{block}_relu"] = nn.ReLU()
            layers[f"transition{block}_conv"] = nn.Conv2d(channels, channels // 2, 1, bias=False)
            layers[f"transition{block}_pool"] = nn.AvgPool2d(2)
            channels //= 2
    layers.update(
        bn=nn.BatchNorm2d(channels),
        relu=nn.ReLU(),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(channels, n_classes),
    )
    return nn.Sequential(layers)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 (skipped when the expansion is 1), depthwise 3x3, project
    1x1; the input is added when the shapes agree."""

    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.expand = (
            nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
            if expansion != 1
            else nn.Identity()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


# (expansion, output channels, blocks, stride of the first block), as in the MobileNetV2 paper
# but with stride 1 in the second stage for 32x32 inputs.
_MOBILENETV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
_MOBILENETV2_STAGES += ((6, 160, 3, 2), (6, 320, 1, 1))


def _mobilenetv2(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(
            nn.Conv2d(shape[0], 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        )
    )
    channels = 32
    for stage, (expansion, out, blocks, stride) in enumerate(_MOBILENETV2_STAGES, start=1):
        for k in range(blocks):
            layers[f"stage{stage}_block{k + 1}"] = _InvertedResidual(
                channels, out, expansion, stride if k == 0 else 1
            )
            channels = out
    layers.update(
        head=nn.Sequential(
            nn.Conv2d(channels, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()
        ),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(1280, n_classes),
    )
    return nn.Sequential(layers)


class _BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions with BatchNorm, a 1x1 projection shortcut when
    the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet18(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(
            nn.Conv2d(shape[0], 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
    )
    channels = 64
    for stage, (width, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), start=1):
        for k in range(2):
            layers[f"stage{stage}_block{k + 1}"] = _BasicBlock(
                channels, width, stride if k == 0 else 1
            )
            channels = width
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(512, n_classes))
    return nn.Sequential(layers)


def _bncnn(shape: tuple[int, ...], n_classes: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(shape[0], 16, 3, padding=1),
            bn1=nn.BatchNorm2d(16),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 3, padding=1),
            bn2=nn.BatchNorm2d(32),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            dropout=nn.Dropout(0.25),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(32, n_classes),
        )
    )


_CIFAR_MODELS = {
    "bncnn": _bncnn,
    "densenet40": _densenet40,
    "mobilenetv2": _mobilenetv2,
    "resnet18": _resnet18,
}


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
    was = model.training
    try:
        # eval mode: the check must not move running statistics or draw dropout masks
        model.eval()
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelError(
            f"model {spec!r} cannot run on inputs of shape {shape}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(
            f"model {spec!r} must map a batch of shape (B, *{shape}) to logits of shape "
            f"(B, {n_classes}); for B=2 it gave {got}"
        )
