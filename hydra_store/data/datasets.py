"""Data sets: load a data set spec into train / validation / test splits of tensors.

Every split keeps, beside its tensors, the index of each sample in the data set's own source
ordering (`Split.source_index`), so a store can say exactly which row of which file each tracked
training sample came from, and `fingerprint` lets a rebuilt data set be checked against the one
that was recorded.

Specs accepted by `load_dataset`:

- ``digits``: scikit-learn's bundled 8x8 digits (offline), 80/20 stratified split by ``seed``.
- ``synthetic`` or ``synthetic:n=10000,size=28,channels=1,classes=10,test=1000``: generated
  images (a fixed random prototype per class plus Gaussian noise), deterministic from ``seed``.
  ``n`` is the number of training samples and ``test`` the number of test samples.
- ``mnist``, ``fashion-mnist``: the official IDX files under ``data_root`` (never downloaded).
- ``cifar10``: the official python pickle batches under ``data_root`` (never downloaded).
- ``path/to/file.npz`` or ``path/to/group.zarr`` (a zarr v3 group): user data, see
  `_bundle_from_arrays` for the rules.
- ``package.module:function``: a user function returning a `DatasetBundle` or a dict of arrays.
"""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import math
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.errors import DataFilesMissingError, DatasetError, InvalidArgumentError
from hydra_store.plugins import is_plugin_spec, load_plugin_function
from hydra_store.resources import available_memory_bytes

KNOWN_DATASETS: tuple[str, ...] = ("digits", "synthetic", "mnist", "fashion-mnist", "cifar10")

_ALIASES: Mapping[str, str] = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}

_ACCEPTED_FORMS = (
    "one of " + ", ".join(KNOWN_DATASETS) + "; 'synthetic:n=10000,size=28,channels=1,classes=10,"
    "test=1000' (any subset of the keys); a path to a .npz file or to a zarr v3 group with arrays "
    "x_train, y_train, x_test, y_test (optional x_val, y_val, class_names); or "
    "'package.module:function' returning a DatasetBundle or a dict of those arrays"
)


_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = (*(f"data_batch_{k}" for k in range(1, 6)), "test_batch")

_SYNTHETIC_DEFAULTS: Mapping[str, int] = {
    "n": 10000,
    "size": 28,
    "channels": 1,
    "classes": 10,
    "test": 1000,
}
# Synthetic images: prototype amplitude and noise level. Chosen so that a linear model learns the
# task well above chance while single samples still look noisy.
_SYNTHETIC_SIGNAL = 0.5
_SYNTHETIC_NOISE = 1.0
# Side of the square blocks the synthetic prototypes are drawn in, so they look like images
# (smooth blobs) rather than white noise.
_SYNTHETIC_BLOCK = 4


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a data set.

    ``inputs`` is float32 (float64 for a float64 run given in Python) of shape
    (n, *input_shape), already normalised; ``targets`` is int64 of
    shape (n,) (class labels), or floating point of shape (n, ...) for a regression run given
    in Python (``hydra_store.RunInputs``); ``source_index`` is int64 (n,): the index of each sample in the data set's own
    source ordering (the row of the official file, of scikit-learn's digits array, of the user's
    array, ...). A split may be empty here; `load_dataset` refuses empty splits.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    source_index: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor) or not isinstance(self.targets, torch.Tensor):
            raise DatasetError("Split.inputs and Split.targets must be torch tensors")
        if not isinstance(self.source_index, np.ndarray):
            raise DatasetError("Split.source_index must be a numpy array")
        if self.inputs.dtype not in (torch.float32, torch.float64):
            raise DatasetError(f"Split.inputs must be float32 or float64, got {self.inputs.dtype}")
        if self.inputs.ndim < 2:
            raise DatasetError(
                f"Split.inputs must have shape (n, *input_shape), got {tuple(self.inputs.shape)}"
            )
        regression = self.targets.is_floating_point() and self.targets.ndim >= 1
        if not regression and (self.targets.dtype != torch.int64 or self.targets.ndim != 1):
            raise DatasetError(
                "Split.targets must be a 1-D int64 tensor (or floating point regression "
                "targets), got "
                f"{self.targets.dtype} of shape {tuple(self.targets.shape)}"
            )
        if self.source_index.dtype != np.int64 or self.source_index.ndim != 1:
            raise DatasetError(
                "Split.source_index must be a 1-D int64 array, got "
                f"{self.source_index.dtype} of shape {self.source_index.shape}"
            )
        n = self.inputs.shape[0]
        if self.targets.shape[0] != n or self.source_index.shape[0] != n:
            raise DatasetError(
                f"Split has {n} inputs but {self.targets.shape[0]} targets and "
                f"{self.source_index.shape[0]} source indices; they must match"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass(frozen=True, eq=False)
class DatasetBundle:
    """A loaded data set. Construction checks that the splits agree with each other."""

    name: str
    train: Split
    test: Split
    validation: Split | None
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    is_image: bool

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DatasetError("DatasetBundle.name must be a non-empty string")
        if not isinstance(self.class_names, tuple) or not all(
            isinstance(c, str) for c in self.class_names
        ):
            raise DatasetError("DatasetBundle.class_names must be a tuple of strings")
        n_classes = len(self.class_names)
        regression = isinstance(self.train, Split) and self.train.targets.is_floating_point()
        if n_classes < 2 and not regression:
            raise DatasetError(f"data set {self.name!r} must have at least 2 classes")
        if len(set(self.class_names)) != n_classes:
            raise DatasetError(f"data set {self.name!r} has duplicate class names")
        shape = self.input_shape
        if (
            not isinstance(shape, tuple)
            or not shape
            or not all(isinstance(s, int) and s > 0 for s in shape)
        ):
            raise DatasetError(
                f"data set {self.name!r}: input_shape must be a tuple of positive ints"
            )
        if len(shape) not in (1, 3):
            raise DatasetError(
                f"data set {self.name!r}: input_shape {shape} must be (C, H, W) for images or "
                "(D,) for vectors"
            )
        if self.is_image != (len(shape) == 3):
            raise DatasetError(
                f"data set {self.name!r}: is_image={self.is_image} does not fit input_shape "
                f"{shape} (images are (C, H, W), vectors (D,))"
            )
        splits: list[tuple[str, Split | None]] = [
            ("train", self.train),
            ("validation", self.validation),
            ("test", self.test),
        ]
        for split_name, split in splits:
            if split is None:
                continue
            if not isinstance(split, Split):
                raise DatasetError(f"data set {self.name!r}: {split_name} must be a Split")
            if len(split) == 0:
                raise DatasetError(f"data set {self.name!r}: the {split_name} split is empty")
            if tuple(split.inputs.shape[1:]) != shape:
                raise DatasetError(
                    f"data set {self.name!r}: {split_name} inputs have per-sample shape "
                    f"{tuple(split.inputs.shape[1:])}, expected {shape}"
                )
            if split.targets.is_floating_point() != regression:
                raise DatasetError(
                    f"data set {self.name!r}: the {split_name} targets must be "
                    + ("floating point like" if regression else "integer labels like")
                    + " the training targets"
                )
            lo, hi = (int(v) for v in torch.aminmax(split.targets)) if not regression else (0, 0)
            if not regression and (lo < 0 or hi >= n_classes):
                raise DatasetError(
                    f"data set {self.name!r}: {split_name} labels must lie in [0, {n_classes}), "
                    f"found values from {lo} to {hi}"
                )
            # aminmax propagates NaN and shows infinities, at a fraction of isfinite's cost.
            if not all(math.isfinite(float(v)) for v in torch.aminmax(split.inputs)):
                raise DatasetError(
                    f"data set {self.name!r}: {split_name} inputs contain NaN or infinite values"
                )

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_regression(self) -> bool:
        return self.train.targets.is_floating_point()


def fingerprint(split: Split) -> str:
    """SHA-256 (hex) of the split's input bytes followed by its target bytes.

    Used to check that a data set rebuilt from a store's recorded config is the one that was
    trained on. The bytes are those of the float32 / int64 tensors in native byte order.
    """
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.inputs.detach().cpu().numpy()).data)
    h.update(np.ascontiguousarray(split.targets.detach().cpu().numpy()).data)
    return h.hexdigest()


def subset(split: Split, indices: np.ndarray) -> Split:
    """The rows of ``split`` at ``indices`` (integer positions in the split, or a boolean mask)."""
    idx = np.asarray(indices)
    n = len(split)
    if idx.dtype == np.bool_:
        if idx.shape != (n,):
            raise InvalidArgumentError(
                f"a boolean mask for a split of {n} samples must have shape ({n},), got {idx.shape}"
            )
        idx = np.flatnonzero(idx)
    if idx.ndim != 1:
        raise InvalidArgumentError(f"indices must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise InvalidArgumentError(f"indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise InvalidArgumentError(
            f"indices must lie in [0, {n}), found values from {idx.min()} to {idx.max()}"
        )
    t = torch.from_numpy(idx)
    return Split(
        inputs=split.inputs.index_select(0, t),
        targets=split.targets.index_select(0, t),
        source_index=split.source_index[idx].copy(),
    )


def load_dataset(
    spec: str,
    *,
    data_root: str | Path | None = None,
    seed: int = 0,
    validation_fraction: float = 0.0,
) -> DatasetBundle:
    """Load the data set named by ``spec`` (see the module docstring for the accepted forms).

    ``seed`` drives every random choice (splits of digits, generation of synthetic data, the
    validation carve-out). ``validation_fraction`` in [0, 0.5) carves a stratified validation
    split out of the training part; it is refused for data sets that come with their own
    validation split (mnist, fashion-mnist, cifar10, user data with x_val / y_val).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(
            f"the data set spec must be a non-empty string; accepted: {_ACCEPTED_FORMS}"
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise InvalidArgumentError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    seed = int(seed)
    if (
        isinstance(validation_fraction, bool)
        or not isinstance(validation_fraction, (int, float, np.floating))
        or not 0.0 <= float(validation_fraction) < 0.5
    ):
        raise InvalidArgumentError(
            f"validation_fraction must be a number in [0, 0.5), got {validation_fraction!r}"
        )
    validation_fraction = float(validation_fraction)
    root = Path(data_root).expanduser() if data_root is not None else None

    spec = spec.strip()
    lowered = spec.lower()
    key = _ALIASES.get(lowered, lowered)
    if key == "digits":
        bundle = _load_digits(seed)
    elif key == "synthetic" or key.startswith("synthetic:"):
        bundle = _load_synthetic(key, seed)
    elif key in ("mnist", "fashion-mnist"):
        bundle = _load_idx_dataset(key, root)
    elif key == "cifar10":
        bundle = _load_cifar10(root)
    elif lowered.endswith(".npz"):
        bundle = _load_npz(_resolve_user_path(spec, root, "npz file"))
    elif _is_zarr_group(Path(spec).expanduser()) or (
        root is not None and _is_zarr_group(root / spec)
    ):
        bundle = _load_zarr_group(_resolve_user_path(spec, root, "zarr group"))
    elif is_plugin_spec(spec):
        bundle = _load_plugin(spec, root, seed)
    elif "/" in spec or "\\" in spec or lowered.endswith(".zarr"):
        raise DatasetError(
            f"data set path {spec!r} is neither a .npz file nor a zarr v3 group "
            f"(a directory holding zarr.json); accepted: {_ACCEPTED_FORMS}"
        )
    else:
        raise DatasetError(f"unknown data set {spec!r}; accepted: {_ACCEPTED_FORMS}")

    if validation_fraction > 0.0:
        if bundle.validation is not None:
            raise InvalidArgumentError(
                f"data set {bundle.name!r} has its own validation split; "
                "leave validation_fraction at 0"
            )
        train, validation = _carve_validation(bundle.train, validation_fraction, seed)
        bundle = replace(bundle, train=train, validation=validation)
    return bundle


# --------------------------------------------------------------------------------------------
# splitting helpers


def _stratified_split(
    targets: np.ndarray, fraction: float, seed: int, *, strict: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the kept part and of the split-off part of size ceil(fraction*n).

    Stratified by class with scikit-learn; when a class is too small to stratify and ``strict``
    is False, falls back to a plain seeded random split.
    """
    from sklearn.model_selection import train_test_split

    positions = np.arange(targets.shape[0])
    try:
        keep, out = train_test_split(
            positions, test_size=fraction, random_state=seed, stratify=targets
        )
    except ValueError as exc:
        if strict:
            raise DatasetError(f"cannot make a stratified split: {exc}") from exc
        keep, out = train_test_split(positions, test_size=fraction, random_state=seed)
    return np.sort(keep), np.sort(out)


def _carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    keep, out = _stratified_split(train.targets.numpy(), fraction, seed, strict=False)
    if keep.size == 0 or out.size == 0:
        raise DatasetError(
            f"the training split of {len(train)} samples is too small to carve a validation "
            f"fraction of {fraction} out of it"
        )
    return subset(train, keep), subset(train, out)


def _make_split(inputs: np.ndarray, targets: np.ndarray, source_index: np.ndarray) -> Split:
    return Split(
        inputs=torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)),
        targets=torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)),
        source_index=np.ascontiguousarray(source_index, dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------
# digits and synthetic


def _load_digits(seed: int) -> DatasetBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32)[:, None, :, :] / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(labels, 0.2, seed, strict=True)
    return DatasetBundle(
        name="digits",
        train=_make_split(images[train_idx], labels[train_idx], train_idx),
        test=_make_split(images[test_idx], labels[test_idx], test_idx),
        validation=None,
        class_names=tuple(str(c) for c in range(10)),
        input_shape=(1, 8, 8),
        is_image=True,
    )


def _parse_synthetic(spec: str) -> dict[str, int]:
    params = dict(_SYNTHETIC_DEFAULTS)
    _, _, rest = spec.partition(":")
    if rest.strip():
        for item in rest.split(","):
            k, sep, v = item.partition("=")
            k, v = k.strip(), v.strip()
            if not sep or k not in params:
                raise DatasetError(
                    f"bad synthetic data set option {item.strip()!r} in {spec!r}; options are "
                    + ", ".join(f"{name}=<int>" for name in _SYNTHETIC_DEFAULTS)
                )
            try:
                params[k] = int(v)
            except ValueError:
                raise DatasetError(
                    f"synthetic data set option {k} must be an integer, got {v!r}"
                ) from None
    for k, v in params.items():
        if v < 1:
            raise DatasetError(f"synthetic data set option {k} must be at least 1, got {v}")
    if params["classes"] < 2:
        raise DatasetError("synthetic data set needs classes >= 2")
    return params


def _check_synthetic_fits(spec: str, p: dict[str, int]) -> None:
    """Refuse, before generating it, a synthetic data set larger than the memory available."""
    image = p["channels"] * p["size"] ** 2 * 4
    needed = (p["n"] + p["test"] + p["classes"]) * image
    available = available_memory_bytes()
    if available is not None and needed > available // 2:
        fits = max(0, available // 2 // image - p["test"] - p["classes"])
        raise DatasetError(
            f"the data set {spec!r} needs {needed / 2**30:,.1f} GiB in memory but "
            f"{available / 2**30:,.1f} GiB are available; at this image size about {fits:,} "
            "training samples fit (use half the memory at most: training needs the rest)"
        )


def _synthetic_labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """Balanced labels (counts differ by at most one), in random order."""
    return rng.permutation(np.arange(n, dtype=np.int64) % classes)


def _synthetic_images(
    rng: np.random.Generator, prototypes: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    x = rng.standard_normal((labels.shape[0], *prototypes.shape[1:]), dtype=np.float32)
    if _SYNTHETIC_NOISE != 1.0:
        x *= np.float32(_SYNTHETIC_NOISE)
    x += prototypes[labels]
    return x


def _load_synthetic(spec: str, seed: int) -> DatasetBundle:
    """Each class is a fixed random blocky prototype image; a sample is its class prototype plus
    Gaussian noise. Prototypes, training set and test set use separate random streams, so the
    prototypes (the task) do not change with n or test."""
    p = _parse_synthetic(spec)
    size, channels, classes = p["size"], p["channels"], p["classes"]
    _check_synthetic_fits(spec, p)
    coarse = math.ceil(size / _SYNTHETIC_BLOCK)
    proto_rng = np.random.default_rng([seed, 0])
    coarse_protos = proto_rng.standard_normal((classes, channels, coarse, coarse), dtype=np.float32)
    protos = np.repeat(np.repeat(coarse_protos, _SYNTHETIC_BLOCK, axis=2), _SYNTHETIC_BLOCK, axis=3)
    protos = np.ascontiguousarray(protos[:, :, :size, :size]) * np.float32(_SYNTHETIC_SIGNAL)

    train_rng = np.random.default_rng([seed, 1])
    y_train = _synthetic_labels(train_rng, p["n"], classes)
    x_train = _synthetic_images(train_rng, protos, y_train)
    test_rng = np.random.default_rng([seed, 2])
    y_test = _synthetic_labels(test_rng, p["test"], classes)
    x_test = _synthetic_images(test_rng, protos, y_test)

    name = "synthetic:" + ",".join(f"{k}={p[k]}" for k in _SYNTHETIC_DEFAULTS)
    return DatasetBundle(
        name=name,
        train=_make_split(x_train, y_train, np.arange(p["n"])),
        test=_make_split(x_test, y_test, np.arange(p["test"])),
        validation=None,
        class_names=tuple(str(c) for c in range(classes)),
        input_shape=(channels, size, size),
        is_image=True,
    )


# --------------------------------------------------------------------------------------------
# mnist and fashion-mnist (IDX files)

_IDX_SOURCES: Mapping[str, tuple[str, str, str]] = {
    # name: (primary directory, torchvision directory, where to get the files)
    "mnist": (
        "mnist",
        "MNIST/raw",
        "https://ossci-datasets.s3.amazonaws.com/mnist/ (mirror of http://yann.lecun.com/exdb/mnist/)",
    ),
    "fashion-mnist": (
        "fashion-mnist",
        "FashionMNIST/raw",
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion/ in the repository, or "
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/)",
    ),
}


def _find_file(directory: Path, base: str, *, allow_gz: bool) -> Path | None:
    candidates = (directory / base, directory / f"{base}.gz") if allow_gz else (directory / base,)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _locate_files(
    name: str,
    root: Path | None,
    dirs: tuple[str, str],
    files: tuple[str, ...],
    *,
    what: str,
    source: str,
    allow_gz: bool,
) -> dict[str, Path]:
    """Find ``files`` in the first of ``root/dirs`` that holds them all.

    Otherwise raise a one-line DataFilesMissingError naming the files, the directory that came
    closest (the first one when none has any) and where to get the files.
    """
    if root is None:
        raise DataFilesMissingError(
            f"{name} is read from local files and no data root was given: pass --data-root DIR "
            f"(data_root= in Python) with {what} in DIR/{dirs[0]}/ (or DIR/{dirs[1]}/); get them "
            f"from {source} (hydra-store never downloads)"
        )
    found_per_dir = []
    for rel in dirs:
        directory = root / rel
        found = {
            f: p for f in files if (p := _find_file(directory, f, allow_gz=allow_gz)) is not None
        }
        if len(found) == len(files):
            return found
        found_per_dir.append(found)
    closest = 1 if len(found_per_dir[1]) > len(found_per_dir[0]) else 0
    missing = [f for f in files if f not in found_per_dir[closest]]
    raise DataFilesMissingError(
        f"{name} files missing: put {what} into {root / dirs[closest]}/ (or "
        f"{root / dirs[1 - closest]}/); missing there: {', '.join(missing)}; get them from "
        f"{source} (hydra-store never downloads)"
    )


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), gzipped or not."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise DatasetError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    if ndim != expected_ndim:
        raise DatasetError(f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: IDX file is truncated (header)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = math.prod(dims)
    if len(raw) != header + count:
        raise DatasetError(
            f"{path}: IDX header says {dims} = {count} bytes of data, file has {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_dataset(name: str, root: Path | None) -> DatasetBundle:
    """Train = the official train file minus its last 10,000 rows (a sixth, for smaller files),
    validation = those rows, test = the official test file: the paper's 50,000/10,000/10,000."""
    primary, torchvision_dir, source = _IDX_SOURCES[name]
    what = ", ".join(_IDX_FILES) + " (each optionally .gz)"
    paths = _locate_files(
        name,
        root,
        (primary, torchvision_dir),
        _IDX_FILES,
        what=what,
        source=source,
        allow_gz=True,
    )
    x_tr = _read_idx(paths["train-images-idx3-ubyte"], 3)
    y_tr = _read_idx(paths["train-labels-idx1-ubyte"], 1)
    x_te = _read_idx(paths["t10k-images-idx3-ubyte"], 3)
    y_te = _read_idx(paths["t10k-labels-idx1-ubyte"], 1)
    for xs, ys, which in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if xs.shape[0] != ys.shape[0]:
            raise DatasetError(
                f"{name}: {which} images file has {xs.shape[0]} images but the labels file has "
                f"{ys.shape[0]} labels"
            )
        if xs.shape[1:] != (28, 28):
            raise DatasetError(f"{name}: {which} images are {xs.shape[1:]}, expected (28, 28)")
    n = x_tr.shape[0]
    n_val = min(10_000, n // 6)
    n_train = n - n_val
    if n_train == 0 or n_val == 0 or x_te.shape[0] == 0:
        raise DatasetError(
            f"{name}: the files hold too few samples ({n} train, {x_te.shape[0]} test)"
        )
    scale = np.float32(1.0 / 255.0)
    train_x = x_tr[:, None].astype(np.float32) * scale
    test_x = x_te[:, None].astype(np.float32) * scale
    idx = np.arange(n)
    class_names = _FASHION_CLASSES if name == "fashion-mnist" else tuple(str(c) for c in range(10))
    return DatasetBundle(
        name=name,
        train=_make_split(train_x[:n_train], y_tr[:n_train], idx[:n_train]),
        validation=_make_split(train_x[n_train:], y_tr[n_train:], idx[n_train:]),
        test=_make_split(test_x, y_te, np.arange(x_te.shape[0])),
        class_names=class_names,
        input_shape=(1, 28, 28),
        is_image=True,
    )


# --------------------------------------------------------------------------------------------
# cifar10 (python pickle batches)

_CIFAR_SOURCE = (
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (the archive unpacks to "
    "cifar-10-batches-py/)"
)
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays only: the CIFAR batches need no more, and
    refusing everything else means a tampered file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        obj = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:
        raise DatasetError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path}: a CIFAR-10 batch must hold 'data' and 'labels'")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: 'data' must be uint8 of shape (n, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' must be {data.shape[0]} integers")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar10(root: Path | None) -> DatasetBundle:
    """Train = the first 40,000 images of data_batch_1..5, validation = the last 10,000 (a fifth,
    for smaller files), test = test_batch. batches.meta is optional (standard names otherwise)."""
    what = ", ".join(_CIFAR_FILES) + " (and optionally batches.meta)"
    paths = _locate_files(
        "cifar10",
        root,
        ("cifar10/cifar-10-batches-py", "cifar-10-batches-py"),
        _CIFAR_FILES,
        what=what,
        source=_CIFAR_SOURCE,
        allow_gz=False,
    )
    directory = paths["test_batch"].parent
    parts = [_read_cifar_batch(directory / f"data_batch_{k}") for k in range(1, 6)]
    x_tr = np.concatenate([p[0] for p in parts])
    y_tr = np.concatenate([p[1] for p in parts])
    x_te, y_te = _read_cifar_batch(directory / "test_batch")
    class_names = _CIFAR10_CLASSES
    meta_path = directory / "batches.meta"
    if meta_path.is_file():
        meta = _unpickle(meta_path)
        names = meta.get("label_names")
        if names is None or len(names) != 10:
            raise DatasetError(f"{meta_path}: 'label_names' must list 10 class names")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    n = x_tr.shape[0]
    n_val = min(10_000, n // 5)
    n_train = n - n_val
    if n_train == 0 or n_val == 0:
        raise DatasetError(f"cifar10: the training batches hold too few samples ({n})")
    scale = np.float32(1.0 / 255.0)
    x_tr_f = x_tr.astype(np.float32) * scale
    idx = np.arange(n)
    return DatasetBundle(
        name="cifar10",
        train=_make_split(x_tr_f[:n_train], y_tr[:n_train], idx[:n_train]),
        validation=_make_split(x_tr_f[n_train:], y_tr[n_train:], idx[n_train:]),
        test=_make_split(x_te.astype(np.float32) * scale, y_te, np.arange(x_te.shape[0])),
        class_names=class_names,
        input_shape=(3, 32, 32),
        is_image=True,
    )


# --------------------------------------------------------------------------------------------
# user data: npz, zarr group, package.module:function

_REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _resolve_user_path(spec: str, root: Path | None, what: str) -> Path:
    """A relative path is tried against the working directory first, then ``data_root``."""
    path = Path(spec).expanduser()
    if not path.exists() and not path.is_absolute() and root is not None and (root / path).exists():
        path = root / path
    if not path.exists():
        where = (
            f" (nor under data root {root})" if root is not None and not path.is_absolute() else ""
        )
        raise DataFilesMissingError(f"{what} {spec!r} not found{where}")
    return path.resolve()


def _is_zarr_group(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def _load_npz(path: Path) -> DatasetBundle:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:
        raise DatasetError(
            f"cannot read {path}: {exc} (save class_names as a string array, not objects)"
        ) from exc
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc
    return _bundle_from_arrays(str(path), arrays, source=str(path))


def _load_zarr_group(path: Path) -> DatasetBundle:
    import zarr

    try:
        group = zarr.open_group(store=str(path), mode="r")
        arrays: dict[str, Any] = {}
        for key in (*_REQUIRED_KEYS, "x_val", "y_val", "class_names"):
            if key in group:
                node = group[key]
                if not isinstance(node, zarr.Array):
                    raise DatasetError(f"{path}/{key} must be an array, not a group")
                arrays[key] = node[...]
        if "class_names" not in arrays and "class_names" in group.attrs:
            arrays["class_names"] = group.attrs["class_names"]
    except DatasetError:
        raise
    except Exception as exc:
        raise DatasetError(f"cannot read zarr group {path}: {exc}") from exc
    return _bundle_from_arrays(str(path), arrays, source=str(path))


def _as_labels(y: Any, key: str, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DatasetError(f"{source}: {key} must be 1-D, got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        return y.astype(np.int64)
    raise DatasetError(f"{source}: {key} must hold integer class labels, got dtype {y.dtype}")


def _as_inputs(x: Any, key: str, source: str) -> np.ndarray:
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DatasetError(f"{source}: {key} must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W): single-channel images
        x = x[:, None]
    if x.ndim not in (2, 4):
        raise DatasetError(
            f"{source}: {key} must be (N, D) vectors, (N, H, W) or (N, C, H, W) images; "
            f"got shape {x.shape}"
        )
    return x.astype(np.float32)


def _bundle_from_arrays(name: str, arrays: Mapping[str, Any], *, source: str) -> DatasetBundle:
    """Build a bundle from user arrays x_train, y_train, x_test, y_test, optional x_val, y_val and
    class_names. Inputs are cast to float32 as given, with no rescaling: normalise them yourself.
    x of ndim 4 is (N, C, H, W), ndim 3 is (N, H, W) (a channel axis is added), ndim 2 is (N, D)
    vectors. Without class_names the classes are 0..max label, named "0", "1", ..."""
    missing = [k for k in _REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DatasetError(
            f"{source} lacks {', '.join(missing)}; user data needs x_train, y_train, x_test, "
            "y_test (optional x_val, y_val, class_names)"
        )
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DatasetError(f"{source}: give both x_val and y_val, or neither")
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part, suffix in (("train", "train"), ("validation", "val"), ("test", "test")):
        if f"x_{suffix}" not in arrays:
            continue
        x = _as_inputs(arrays[f"x_{suffix}"], f"x_{suffix}", source)
        y = _as_labels(arrays[f"y_{suffix}"], f"y_{suffix}", source)
        if x.shape[0] != y.shape[0]:
            raise DatasetError(
                f"{source}: x_{suffix} has {x.shape[0]} samples but y_{suffix} has {y.shape[0]}"
            )
        if x.shape[0] == 0:
            raise DatasetError(f"{source}: the {part} split (x_{suffix}) is empty")
        parts[part] = (x, y)
    shapes = {part: xy[0].shape[1:] for part, xy in parts.items()}
    if len(set(shapes.values())) != 1:
        raise DatasetError(f"{source}: per-sample input shapes differ between splits: {shapes}")
    input_shape = tuple(int(s) for s in shapes["train"])

    if "class_names" in arrays and arrays["class_names"] is not None:
        names = np.asarray(arrays["class_names"])
        if names.ndim != 1:
            raise DatasetError(f"{source}: class_names must be a 1-D list of names")
        class_names = tuple(str(c) for c in names.tolist())
    else:
        hi = max(int(y.max()) for _, y in parts.values())
        class_names = tuple(str(c) for c in range(max(hi + 1, 2)))
    n_classes = len(class_names)
    for part, (_, y) in parts.items():
        if y.min() < 0 or y.max() >= n_classes:
            raise DatasetError(
                f"{source}: {part} labels must lie in [0, {n_classes}), found values from "
                f"{int(y.min())} to {int(y.max())}"
            )

    splits = {part: _make_split(x, y, np.arange(x.shape[0])) for part, (x, y) in parts.items()}
    return DatasetBundle(
        name=name,
        train=splits["train"],
        test=splits["test"],
        validation=splits.get("validation"),
        class_names=class_names,
        input_shape=input_shape,
        is_image=len(input_shape) == 3,
    )


def _load_plugin(spec: str, root: Path | None, seed: int) -> DatasetBundle:
    func = load_plugin_function(spec, what="data set", error=DatasetError)
    kwargs: dict[str, Any] = {"seed": seed}
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        params = {}
    if "data_root" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs["data_root"] = root
    try:
        result = func(**kwargs)
    except Exception as exc:
        raise DatasetError(
            f"data set function {spec!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(result, DatasetBundle):
        return replace(result, name=spec)
    if isinstance(result, Mapping):
        return _bundle_from_arrays(spec, result, source=f"data set function {spec!r}")
    raise DatasetError(
        f"data set function {spec!r} must return a DatasetBundle or a dict with x_train, y_train, "
        f"x_test, y_test; it returned {type(result).__name__}"
    )
