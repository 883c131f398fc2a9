"""Tests of hydra_store.data: built-in, file-based and user data sets."""

from __future__ import annotations

import gzip
import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from hydra_store.data.datasets import (
    KNOWN_DATASETS,
    DatasetBundle,
    Split,
    fingerprint,
    load_dataset,
    subset,
)
from hydra_store.errors import DataFilesMissingError, DatasetError, InvalidArgumentError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

# ---------------------------------------------------------------------------------------------
# digits


def test_known_datasets() -> None:
    assert KNOWN_DATASETS == ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")


def test_digits_shapes_and_values() -> None:
    from sklearn.datasets import load_digits

    b = load_dataset("digits", seed=0)
    assert b.name == "digits"
    assert b.input_shape == (1, 8, 8)
    assert b.is_image
    assert b.class_names == tuple(str(c) for c in range(10))
    assert b.validation is None
    assert b.train.inputs.shape == (1437, 1, 8, 8)
    assert b.test.inputs.shape == (360, 1, 8, 8)
    assert b.train.inputs.dtype == torch.float32
    assert b.train.targets.dtype == torch.int64
    assert b.train.source_index.dtype == np.int64
    assert float(b.train.inputs.min()) == 0.0
    assert float(b.train.inputs.max()) == 1.0
    # Train and test partition sklearn's array, and each row is that array's row / 16.
    both = np.concatenate([b.train.source_index, b.test.source_index])
    np.testing.assert_array_equal(np.sort(both), np.arange(1797))
    digits = load_digits()
    for split in (b.train, b.test):
        np.testing.assert_allclose(
            split.inputs.numpy()[:, 0], digits.images[split.source_index] / 16.0, rtol=1e-6
        )
        np.testing.assert_array_equal(split.targets.numpy(), digits.target[split.source_index])


def test_digits_split_is_stratified() -> None:
    b = load_dataset("digits", seed=3)
    total = np.bincount(np.concatenate([b.train.targets.numpy(), b.test.targets.numpy()]))
    test_counts = np.bincount(b.test.targets.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * total) <= 1.0)


def test_digits_deterministic_by_seed() -> None:
    a, b, c = (load_dataset("digits", seed=s) for s in (1, 1, 2))
    assert fingerprint(a.train) == fingerprint(b.train)
    np.testing.assert_array_equal(a.test.source_index, b.test.source_index)
    assert fingerprint(a.train) != fingerprint(c.train)
    assert not np.array_equal(a.test.source_index, c.test.source_index)


def test_digits_validation_fraction() -> None:
    plain = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0, validation_fraction=0.2)
    assert b.validation is not None
    assert len(b.train) + len(b.validation) == 1437
    assert len(b.validation) == math.ceil(0.2 * 1437)
    # Carved out of the same training part, disjoint, test untouched.
    carved = np.concatenate([b.train.source_index, b.validation.source_index])
    np.testing.assert_array_equal(np.sort(carved), np.sort(plain.train.source_index))
    assert fingerprint(b.test) == fingerprint(plain.test)
    # Stratified: each class's share of the validation split matches its share of train.
    train_counts = np.bincount(plain.train.targets.numpy(), minlength=10)
    val_counts = np.bincount(b.validation.targets.numpy(), minlength=10)
    assert np.all(np.abs(val_counts - 0.2 * train_counts) <= 1.0)


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.9, float("nan"), "0.1"])
def test_validation_fraction_out_of_range(fraction: object) -> None:
    with pytest.raises(InvalidArgumentError, match="validation_fraction"):
        load_dataset("digits", validation_fraction=fraction)  # type: ignore[arg-type]


def test_bad_seed() -> None:
    with pytest.raises(InvalidArgumentError, match="seed"):
        load_dataset("digits", seed=-1)


def test_unknown_spec_lists_known_names() -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset("imagenet")
    msg = str(info.value)
    for name in KNOWN_DATASETS:
        assert name in msg
    assert ".npz" in msg and "zarr" in msg and "package.module:function" in msg


def test_missing_path_spec() -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("no/such/file.npz")
    with pytest.raises(DatasetError, match="zarr"):
        load_dataset("no/such/group.zarr")


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_defaults_and_parsing() -> None:
    b = load_dataset("synthetic", seed=0)
    assert b.name == "synthetic:n=10000,size=28,channels=1,classes=10,test=1000"
    assert b.train.inputs.shape == (10000, 1, 28, 28)
    assert b.test.inputs.shape == (1000, 1, 28, 28)
    c = load_dataset("synthetic:classes=3, size=12,channels=2 ,n=30,test=7", seed=0)
    assert c.name == "synthetic:n=30,size=12,channels=2,classes=3,test=7"
    assert c.input_shape == (2, 12, 12)
    assert c.class_names == ("0", "1", "2")
    assert c.train.inputs.shape == (30, 2, 12, 12)
    assert c.test.inputs.shape == (7, 2, 12, 12)
    # Balanced classes.
    np.testing.assert_array_equal(np.bincount(c.train.targets.numpy()), [10, 10, 10])
    np.testing.assert_array_equal(c.train.source_index, np.arange(30))


@pytest.mark.parametrize(
    "spec", ["synthetic:n=0", "synthetic:classes=1", "synthetic:depth=3", "synthetic:n=ten"]
)
def test_synthetic_bad_options(spec: str) -> None:
    with pytest.raises(DatasetError):
        load_dataset(spec)


def test_synthetic_deterministic_by_seed() -> None:
    spec = "synthetic:n=200,size=10,test=50"
    a, b, c = (load_dataset(spec, seed=s) for s in (5, 5, 6))
    assert fingerprint(a.train) == fingerprint(b.train)
    assert fingerprint(a.test) == fingerprint(b.test)
    assert fingerprint(a.train) != fingerprint(c.train)
    # The task (prototypes) and the test set do not depend on the training-set size.
    d = load_dataset("synthetic:n=400,size=10,test=50", seed=5)
    assert fingerprint(d.test) == fingerprint(a.test)


def test_synthetic_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    b = load_dataset("synthetic:n=500,size=8,classes=5,test=200", seed=0)
    clf = LogisticRegression(max_iter=200)
    clf.fit(b.train.inputs.flatten(1).numpy(), b.train.targets.numpy())
    acc = clf.score(b.test.inputs.flatten(1).numpy(), b.test.targets.numpy())
    assert acc > 0.6  # chance is 0.2


def test_synthetic_large_is_fast() -> None:
    start = time.perf_counter()
    b = load_dataset("synthetic:n=50000", seed=0)
    elapsed = time.perf_counter() - start
    assert b.train.inputs.shape == (50000, 1, 28, 28)
    assert elapsed < 6.0


# ---------------------------------------------------------------------------------------------
# mnist / fashion-mnist IDX files


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(
    directory: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (directory / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_reading(tmp_path: Path, gz: bool) -> None:
    arrays = _write_idx_set(tmp_path / "mnist", gz=gz)
    b = load_dataset("mnist", data_root=tmp_path)
    assert b.name == "mnist"
    assert b.input_shape == (1, 28, 28)
    assert b.class_names == tuple(str(c) for c in range(10))
    assert b.validation is not None
    # 12 rows: the last sixth (2) is validation, like 50,000 / 10,000 of the official 60,000.
    assert (len(b.train), len(b.validation), len(b.test)) == (10, 2, 5)
    images = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255.0
    labels = arrays["train-labels-idx1-ubyte"]
    np.testing.assert_allclose(b.train.inputs.numpy()[:, 0], images[:10], rtol=1e-6)
    np.testing.assert_allclose(b.validation.inputs.numpy()[:, 0], images[10:], rtol=1e-6)
    np.testing.assert_array_equal(b.train.targets.numpy(), labels[:10])
    np.testing.assert_array_equal(b.validation.targets.numpy(), labels[10:])
    np.testing.assert_array_equal(b.train.source_index, np.arange(10))
    np.testing.assert_array_equal(b.validation.source_index, [10, 11])
    np.testing.assert_allclose(
        b.test.inputs.numpy()[:, 0],
        arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255.0,
        rtol=1e-6,
    )
    np.testing.assert_array_equal(b.test.targets.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    arrays = _write_idx_set(tmp_path / "FashionMNIST" / "raw", n_train=18, gz=True, seed=1)
    b = load_dataset("fashion-mnist", data_root=str(tmp_path))
    assert b.name == "fashion-mnist"
    assert b.class_names[0] == "T-shirt/top"
    assert b.class_names[9] == "Ankle boot"
    assert len(b.class_names) == 10
    assert b.validation is not None
    assert (len(b.train), len(b.validation)) == (15, 3)
    np.testing.assert_array_equal(b.test.targets.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_mnist_missing_file_names_file_and_directory(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist", gz=True)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFilesMissingError) as info:
        load_dataset("mnist", data_root=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{tmp_path / 'mnist'}/" in msg
    missing_part = msg.split("missing there:")[1].split(";")[0]
    assert missing_part.strip() == "t10k-labels-idx1-ubyte"
    assert "http" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_mnist_nothing_there_lists_all_files(tmp_path: Path) -> None:
    with pytest.raises(DataFilesMissingError) as info:
        load_dataset("fashion-mnist", data_root=tmp_path / "nowhere")
    msg = str(info.value)
    for name in IDX_FILES:
        assert name in msg
    assert "fashion-mnist/" in msg
    assert "zalandoresearch" in msg


def test_file_datasets_need_data_root() -> None:
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(DataFilesMissingError, match="--data-root"):
            load_dataset(name)


def test_mnist_corrupt_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DatasetError, match="magic"):
        load_dataset("mnist", data_root=tmp_path)


def test_mnist_count_mismatch(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    labels = np.zeros(7, dtype=np.uint8)
    (tmp_path / "mnist" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(DatasetError, match="12 images but the labels file has 7"):
        load_dataset("mnist", data_root=tmp_path)


def test_fixed_validation_refuses_fraction(tmp_path: Path) -> None:
    _write_idx_set(tmp_path / "mnist")
    with pytest.raises(InvalidArgumentError, match="own validation split"):
        load_dataset("mnist", data_root=tmp_path, validation_fraction=0.1)


# ---------------------------------------------------------------------------------------------
# cifar10 pickle batches


def _write_cifar(directory: Path, *, per_batch: int = 3, n_test: int = 4) -> dict[str, object]:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, n in [*((f"data_batch_{k}", per_batch) for k in range(1, 6)), ("test_batch", n_test)]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {b"label_names": [f"class{k}".encode() for k in range(10)]}
    (directory / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def test_cifar10_reading(tmp_path: Path) -> None:
    batches = _write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py")
    b = load_dataset("cifar10", data_root=tmp_path)
    assert b.name == "cifar10"
    assert b.input_shape == (3, 32, 32)
    assert b.class_names == tuple(f"class{k}" for k in range(10))
    assert b.validation is not None
    # 15 training rows: the last fifth (3) is validation, like 40,000 / 10,000 of 50,000.
    assert (len(b.train), len(b.validation), len(b.test)) == (12, 3, 4)
    train_data = np.concatenate([batches[f"data_batch_{k}"][b"data"] for k in range(1, 6)])
    train_labels = np.concatenate([batches[f"data_batch_{k}"][b"labels"] for k in range(1, 6)])
    # Row layout of the official files: 1024 red, then 1024 green, then 1024 blue, row-major.
    first = train_data[0]
    assert b.train.inputs[0, 1, 0, 0].item() == pytest.approx(first[1024] / 255.0)
    assert b.train.inputs[0, 2, 31, 31].item() == pytest.approx(first[3071] / 255.0)
    np.testing.assert_allclose(
        b.validation.inputs.numpy().reshape(3, -1), train_data[12:] / 255.0, rtol=1e-6
    )
    np.testing.assert_array_equal(b.train.targets.numpy(), train_labels[:12])
    np.testing.assert_array_equal(b.validation.source_index, [12, 13, 14])
    np.testing.assert_array_equal(b.test.targets.numpy(), batches["test_batch"][b"labels"])


def test_cifar10_flat_layout_and_default_names(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar(directory)
    (directory / "batches.meta").unlink()
    b = load_dataset("cifar10", data_root=tmp_path)
    assert b.class_names[0] == "airplane"
    assert b.class_names[9] == "truck"


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    directory = tmp_path / "cifar10" / "cifar-10-batches-py"
    _write_cifar(directory)
    (directory / "data_batch_4").unlink()
    with pytest.raises(DataFilesMissingError) as info:
        load_dataset("cifar10", data_root=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.split("missing there:")[1].split(";")[0].strip() == "data_batch_4"
    assert f"{directory}/" in msg
    assert "cifar-10-python.tar.gz" in msg


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    directory = tmp_path / "cifar-10-batches-py"
    _write_cifar(directory)
    (directory / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    with pytest.raises(DatasetError, match=r"refusing to load builtins\.print"):
        load_dataset("cifar10", data_root=tmp_path)


# ---------------------------------------------------------------------------------------------
# user data: npz, zarr group


def _user_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.normal(size=(20, 6, 6)).astype(np.float64) * 100.0,
        "y_train": np.arange(20) % 3,
        "x_test": rng.normal(size=(8, 6, 6)),
        "y_test": np.arange(8) % 3,
    }


def test_npz_images_without_rescaling(tmp_path: Path) -> None:
    arrays = _user_arrays()
    path = tmp_path / "data.npz"
    np.savez(path, **arrays, class_names=np.array(["cat", "dog", "cow"]))
    b = load_dataset(str(path))
    assert b.name == str(path.resolve())
    assert b.is_image
    assert b.input_shape == (1, 6, 6)
    assert b.class_names == ("cat", "dog", "cow")
    assert b.validation is None
    np.testing.assert_allclose(
        b.train.inputs.numpy()[:, 0], arrays["x_train"].astype(np.float32), rtol=0
    )
    np.testing.assert_array_equal(b.test.targets.numpy(), arrays["y_test"])
    np.testing.assert_array_equal(b.train.source_index, np.arange(20))


def test_npz_vectors_with_validation(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "vec.npz"
    np.savez(
        path,
        x_train=rng.normal(size=(10, 4)),
        y_train=np.array([0, 1, 2, 3, 4] * 2, dtype=np.int32),
        x_test=rng.normal(size=(3, 4)),
        y_test=np.array([0.0, 1.0, 4.0]),  # integral floats are accepted as labels
        x_val=rng.normal(size=(2, 4)),
        y_val=np.array([1, 2]),
    )
    b = load_dataset(str(path))
    assert not b.is_image
    assert b.input_shape == (4,)
    assert b.class_names == ("0", "1", "2", "3", "4")
    assert b.validation is not None
    assert len(b.validation) == 2
    np.testing.assert_array_equal(b.test.targets.numpy(), [0, 1, 4])
    with pytest.raises(InvalidArgumentError):
        load_dataset(str(path), validation_fraction=0.2)


def test_npz_nchw_and_relative_to_data_root(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "rgb.npz",
        x_train=rng.random((6, 3, 5, 5)),
        y_train=np.array([0, 1] * 3),
        x_test=rng.random((2, 3, 5, 5)),
        y_test=np.array([1, 0]),
    )
    b = load_dataset("rgb.npz", data_root=tmp_path, validation_fraction=0.34)
    assert b.input_shape == (3, 5, 5)
    assert b.validation is not None
    assert len(b.train) + len(b.validation) == 6


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"y_train": np.arange(20) % 3 - 1}, r"labels must lie in \[0, 3\)"),
        ({"y_test": np.full(8, 0.5)}, "integer class labels"),
        ({"y_train": np.arange(19) % 3}, "20 samples but y_train has 19"),
        ({"x_test": np.zeros((8, 5, 6))}, "shapes differ"),
        ({"x_test": np.zeros((0, 6, 6)), "y_test": np.zeros(0, dtype=int)}, "empty"),
        ({"x_train": np.zeros((20, 2, 2, 2, 2))}, "must be"),
        ({"x_val": np.zeros((2, 6, 6))}, "both x_val and y_val"),
        ({"x_train": np.full((20, 6, 6), np.nan)}, "NaN"),
    ],
)
def test_npz_validation_errors(tmp_path: Path, change: dict[str, np.ndarray], match: str) -> None:
    arrays = {**_user_arrays(), **change}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=match):
        load_dataset(str(path))


def test_npz_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "partial.npz"
    np.savez(path, x_train=np.zeros((3, 2)), y_train=np.array([0, 1, 0]))
    with pytest.raises(DatasetError, match="lacks x_test, y_test"):
        load_dataset(str(path))


def test_npz_class_names_bound_labels(tmp_path: Path) -> None:
    path = tmp_path / "names.npz"
    np.savez(path, **_user_arrays(), class_names=np.array(["a", "b"]))
    with pytest.raises(DatasetError, match=r"\[0, 2\)"):
        load_dataset(str(path))


def test_zarr_group(tmp_path: Path) -> None:
    arrays = _user_arrays(seed=4)
    path = tmp_path / "user.zarr"
    group = zarr.open_group(str(path), mode="w")
    for key, value in arrays.items():
        group.create_array(key, data=np.asarray(value))
    group.attrs["class_names"] = ["x", "y", "z"]
    b = load_dataset(str(path))
    assert b.name == str(path.resolve())
    assert b.class_names == ("x", "y", "z")
    assert b.input_shape == (1, 6, 6)
    np.testing.assert_allclose(
        b.test.inputs.numpy()[:, 0], arrays["x_test"].astype(np.float32), rtol=0
    )
    np.testing.assert_array_equal(b.train.targets.numpy(), arrays["y_train"])


def test_zarr_group_missing_array(tmp_path: Path) -> None:
    path = tmp_path / "partial.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array("x_train", data=np.zeros((4, 3)))
    with pytest.raises(DatasetError, match="lacks y_train, x_test, y_test"):
        load_dataset(str(path))


# ---------------------------------------------------------------------------------------------
# user data: package.module:function


def test_plugin_dict() -> None:
    b = load_dataset("tests.user_plugins:vector_data", seed=3)
    assert b.name == "tests.user_plugins:vector_data"
    assert b.input_shape == (3,)
    assert b.class_names == ("low", "high")
    assert len(b.train) == 40
    again = load_dataset("tests.user_plugins:vector_data", seed=3)
    assert fingerprint(again.train) == fingerprint(b.train)
    other = load_dataset("tests.user_plugins:vector_data", seed=4)
    assert fingerprint(other.train) != fingerprint(b.train)


def test_plugin_gets_data_root(tmp_path: Path) -> None:
    np.savez(tmp_path / "plugin.npz", **_user_arrays())
    b = load_dataset("tests.user_plugins:data_from_root", data_root=tmp_path)
    assert len(b.train) == 20
    with pytest.raises(DatasetError, match="needs a data root"):
        load_dataset("tests.user_plugins:data_from_root")


def test_plugin_bundle_renamed_and_carved() -> None:
    b = load_dataset("tests.user_plugins:bundle_data", validation_fraction=0.3)
    assert b.name == "tests.user_plugins:bundle_data"
    assert b.class_names == ("a", "b", "c")
    assert b.validation is not None
    assert len(b.train) + len(b.validation) == 9


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
        ("tests.user_plugins:no_such_function", "has no function 'no_such_function'"),
        ("tests.user_plugins:failing_data", "RuntimeError: the plug-in's own failure"),
        ("tests.user_plugins:wrong_type_data", "returned int"),
    ],
)
def test_plugin_errors(spec: str, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset(spec)


# ---------------------------------------------------------------------------------------------
# Split, DatasetBundle, fingerprint, subset


def _small_split() -> Split:
    return Split(
        inputs=torch.arange(12, dtype=torch.float32).reshape(4, 3),
        targets=torch.tensor([0, 1, 1, 0]),
        source_index=np.array([10, 11, 12, 13], dtype=np.int64),
    )


def test_fingerprint_changes_with_a_label() -> None:
    split = _small_split()
    fp = fingerprint(split)
    assert len(fp) == 64
    assert int(fp, 16) >= 0
    assert fingerprint(_small_split()) == fp
    targets = split.targets.clone()
    targets[2] = 0
    changed = Split(inputs=split.inputs, targets=targets, source_index=split.source_index)
    assert fingerprint(changed) != fp
    inputs = split.inputs.clone()
    inputs[0, 0] = 0.5
    assert fingerprint(Split(inputs, split.targets, split.source_index)) != fp


def test_subset() -> None:
    split = _small_split()
    sub = subset(split, np.array([3, 1]))
    np.testing.assert_array_equal(sub.source_index, [13, 11])
    np.testing.assert_array_equal(sub.targets.numpy(), [0, 1])
    np.testing.assert_array_equal(sub.inputs.numpy(), [[9, 10, 11], [3, 4, 5]])
    masked = subset(split, np.array([True, False, False, True]))
    np.testing.assert_array_equal(masked.source_index, [10, 13])
    assert len(subset(split, np.array([], dtype=np.int64))) == 0
    with pytest.raises(InvalidArgumentError):
        subset(split, np.array([4]))
    with pytest.raises(InvalidArgumentError):
        subset(split, np.array([-1]))
    with pytest.raises(InvalidArgumentError):
        subset(split, np.array([True, False]))


def test_split_validates_types() -> None:
    with pytest.raises(DatasetError, match=r"float32 or float64, got torch\.float16"):
        Split(
            torch.zeros(2, 3, dtype=torch.float16), torch.zeros(2, dtype=torch.int64), np.arange(2)
        )
    # float64 inputs (a float64 run given in Python) and floating regression targets are kept
    regression = Split(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 1), np.arange(2))
    assert regression.inputs.dtype == torch.float64
    bundle = DatasetBundle("r", regression, regression, None, (), (3,), False)
    assert bundle.is_regression and bundle.n_classes == 0
    labelled = Split(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), np.arange(2))
    with pytest.raises(DatasetError, match="test targets must be floating point"):
        DatasetBundle("r", regression, labelled, None, (), (3,), False)
    with pytest.raises(DatasetError, match="int64"):
        Split(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32), np.arange(2))
    with pytest.raises(DatasetError, match="must match"):
        Split(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64), np.arange(2))


def test_bundle_validates_consistency() -> None:
    split = _small_split()
    with pytest.raises(DatasetError, match="per-sample shape"):
        DatasetBundle("x", split, split, None, ("a", "b"), (4,), False)
    with pytest.raises(DatasetError, match="is_image"):
        DatasetBundle("x", split, split, None, ("a", "b"), (3,), True)
    with pytest.raises(DatasetError, match="at least 2 classes"):
        DatasetBundle("x", split, split, None, ("a",), (3,), False)
    three = Split(split.inputs, torch.tensor([0, 2, 1, 0]), split.source_index)
    with pytest.raises(
        DatasetError, match=r"labels must lie in \[0, 2\), found values from 0 to 2"
    ):
        DatasetBundle("x", split, three, None, ("a", "b"), (3,), False)
    empty = subset(split, np.array([], dtype=np.int64))
    with pytest.raises(DatasetError, match="test split is empty"):
        DatasetBundle("x", split, empty, None, ("a", "b"), (3,), False)
    ok = DatasetBundle("x", split, split, None, ("a", "b"), (3,), False)
    assert ok.n_classes == 2


def test_a_synthetic_data_set_larger_than_memory_is_refused_before_generating(monkeypatch):
    monkeypatch.setattr("hydra_store.data.datasets.available_memory_bytes", lambda: 2**30)
    # half of 1 GiB holds 2**29 // (11 * 11 * 4) = 1,109,237 images, less 1,000 test, 10 prototypes
    with pytest.raises(DatasetError, match=r"needs 41,350\.7 GiB in memory but 1\.0 GiB"):
        load_dataset("synthetic:n=100,size=100000")
    with pytest.raises(DatasetError, match=r"about 1,108,227 training samples fit"):
        load_dataset("synthetic:n=2000000,size=11")
    assert load_dataset("synthetic:n=1000,size=11").train.inputs.shape == (1000, 1, 11, 11)
