"""Tests of hydra_store.models: built-in models, user models, and refused layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hydra_store.data.models import KNOWN_MODELS, build_model, check_supported_model
from hydra_store.errors import InvalidArgumentError, ModelError


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_known_models() -> None:
    assert KNOWN_MODELS == (
        "logreg",
        "mlp",
        "lenet5",
        "bncnn",
        "densenet40",
        "mobilenetv2",
        "resnet18",
    )


@pytest.mark.parametrize(
    ("name", "count"),
    [
        ("densenet40", 176_122),
        ("mobilenetv2", 2_236_682),
        ("resnet18", 11_173_962),
        ("bncnn", 5_514),
    ],
)
def test_the_papers_networks_have_its_parameter_counts(name: str, count: int) -> None:
    """DenseNet-40 (growth 12, BC) and MobileNetV2 on 3x32x32 with 10 classes: the HyDRA
    paper's counts; building leaves the running statistics at their initial values."""
    model = build_model(name, input_shape=(3, 32, 32), n_classes=10)
    assert n_params(model) == count
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 0 for m in norms)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in norms)
    assert model.training
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_lenet5_mnist_has_paper_parameter_count() -> None:
    model = build_model("lenet5", input_shape=(1, 28, 28), n_classes=10)
    assert n_params(model) == 61_706
    names = [name for name, _ in model.named_parameters()]
    assert names == [
        f"{layer}.{kind}"
        for layer in ("conv1", "conv2", "fc1", "fc2", "fc3")
        for kind in ("weight", "bias")
    ]
    assert model[0].padding == (2, 2)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # ReLU and max pooling, as in the paper's supplement.
    kinds = {type(m) for m in model.modules()}
    assert nn.ReLU in kinds and nn.MaxPool2d in kinds and nn.Tanh not in kinds


def test_lenet5_cifar_shape() -> None:
    model = build_model("lenet5", input_shape=(3, 32, 32), n_classes=10)
    assert model[0].padding == (0, 0)
    # Only conv1 differs from the MNIST model: 3 input channels instead of 1.
    assert n_params(model) == 61_706 + 2 * 6 * 5 * 5
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_lenet5_larger_images_widen_fc1() -> None:
    model = build_model("lenet5", input_shape=(1, 40, 36), n_classes=4)
    # 40 -> 36 -> 18 -> 14 -> 7 and 36 -> 32 -> 16 -> 12 -> 6
    assert model.fc1.in_features == 16 * 7 * 6
    assert model(torch.rand(2, 1, 40, 36)).shape == (2, 4)


@pytest.mark.parametrize("shape", [(1, 8, 8), (64,), (1, 28, 20)])
def test_lenet5_refuses_small_inputs(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError) as info:
        build_model("lenet5", input_shape=shape, n_classes=10)
    msg = str(info.value)
    assert "28x28" in msg
    assert "mlp" in msg and "logreg" in msg


def test_logreg() -> None:
    model = build_model("logreg", input_shape=(1, 8, 8), n_classes=10)
    assert n_params(model) == 64 * 10 + 10
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1


def test_mlp_default_and_hidden_sizes() -> None:
    default = build_model("mlp", input_shape=(1, 8, 8), n_classes=10)
    assert n_params(default) == (64 * 32 + 32) + (32 * 10 + 10)
    deep = build_model("MLP:hidden=64,32", input_shape=(20,), n_classes=3)
    widths = [(m.in_features, m.out_features) for m in deep.modules() if isinstance(m, nn.Linear)]
    assert widths == [(20, 64), (64, 32), (32, 3)]
    assert sum(isinstance(m, nn.ReLU) for m in deep.modules()) == 2
    assert deep(torch.zeros(4, 20)).shape == (4, 3)


@pytest.mark.parametrize("spec", ["mlp:hidden=", "mlp:hidden=0", "mlp:width=3", "mlp:hidden=a,b"])
def test_mlp_bad_options(spec: str) -> None:
    with pytest.raises(ModelError, match="mlp"):
        build_model(spec, input_shape=(4,), n_classes=2)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet50", input_shape=(3, 32, 32), n_classes=10)
    for name in KNOWN_MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_shape": (), "n_classes": 2}, "input_shape"),
        ({"input_shape": (0, 3), "n_classes": 2}, "input_shape"),
        ({"input_shape": (4,), "n_classes": 1}, "n_classes"),
        ({"input_shape": (4,), "n_classes": 2, "seed": -1}, "seed"),
        ({"input_shape": (4,), "n_classes": 2, "dtype": torch.int32}, "dtype"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        build_model("logreg", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["logreg", "mlp", "lenet5"])
def test_init_is_deterministic_by_seed(spec: str) -> None:
    shape = (1, 28, 28)
    a = build_model(spec, input_shape=shape, n_classes=10, seed=7)
    b = build_model(spec, input_shape=shape, n_classes=10, seed=7)
    c = build_model(spec, input_shape=shape, n_classes=10, seed=8)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_init_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build_model("lenet5", input_shape=(1, 28, 28), n_classes=10, seed=0)
    assert torch.equal(torch.rand(5), expected)


def test_dtype() -> None:
    model = build_model("mlp", input_shape=(6,), n_classes=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    ref = build_model("mlp", input_shape=(6,), n_classes=2)
    for p64, p32 in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p64.float(), p32)


# ---------------------------------------------------------------------------------------------
# check_supported_model


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (nn.SyncBatchNorm(8), "gathered across processes"),
        (nn.LazyBatchNorm1d(), "not initialised yet"),
        (nn.BatchNorm1d(8, track_running_stats=False), "keep track_running_stats=True"),
        (nn.InstanceNorm1d(8, track_running_stats=True), "use track_running_stats=False"),
        (nn.RReLU(), "random slopes"),
        (nn.GRU(8, 8, num_layers=2, dropout=0.2), "internal dropout is not replayed"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_layers_that_cannot_be_replayed_are_refused_with_the_reason(
    layer: nn.Module, reason: str
) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), layer), nn.Linear(8, 2))
    with pytest.raises(ModelError, match=reason) as info:
        check_supported_model(model)
    assert f"layer '1.1' is {type(layer).__name__}" in str(info.value)


@pytest.mark.parametrize(
    "layer",
    [nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Dropout1d(0.1), nn.AlphaDropout(0.2), nn.Dropout(0)],
    ids=type,
)
def test_batch_norm_and_dropout_are_supported(layer: nn.Module) -> None:
    check_supported_model(nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 2)))


def test_no_trainable_parameters_refused() -> None:
    frozen = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ModelError, match="no trainable parameters"):
        check_supported_model(frozen)
    with pytest.raises(ModelError, match="no trainable parameters"):
        check_supported_model(nn.Sequential(nn.Flatten(), nn.ReLU()))


def test_sample_local_normalisation_allowed() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
        nn.LayerNorm(10),
    )
    check_supported_model(model)  # does not raise
    with pytest.raises(ModelError, match=r"must be a torch\.nn\.Module"):
        check_supported_model("lenet5")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# user models


def test_plugin_model_deterministic() -> None:
    a = build_model("tests.user_plugins:tiny_model", input_shape=(2, 3), n_classes=4, seed=1)
    b = build_model("tests.user_plugins:tiny_model", input_shape=(2, 3), n_classes=4, seed=1)
    c = build_model("tests.user_plugins:tiny_model", input_shape=(2, 3), n_classes=4, seed=2)
    assert a(torch.zeros(1, 2, 3)).shape == (1, 4)
    assert n_params(a) == (6 * 5 + 5) + (5 * 4 + 4)
    assert torch.equal(a[1].weight, b[1].weight)
    assert not torch.equal(a[1].weight, c[1].weight)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tests.user_plugins:wrong_output_model", r"logits of shape \(B, 3\)"),
        ("tests.user_plugins:not_a_model", "must return a torch.nn.Module"),
        ("tests.user_plugins:missing", "has no function 'missing'"),
        ("tests.nowhere:model", "cannot import module 'tests.nowhere'"),
    ],
)
def test_plugin_model_errors(spec: str, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        build_model(spec, input_shape=(4,), n_classes=3)


def test_plugin_model_wrong_input_shape() -> None:
    # The plug-in ignores input_shape: caught when the model is built, not during training.
    with pytest.raises(ModelError, match=r"cannot run on inputs of shape \(1, 28, 28\)"):
        build_model("tests.user_plugins:fixed_input_model", input_shape=(1, 28, 28), n_classes=10)
