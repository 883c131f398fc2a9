"""The store: a Zarr v3 group laid out so that `xr.open_zarr(path)` gives the recording as one
Dataset (docs/store-format.md). Opening, status, consolidation, and output-path checks; knows
nothing of training."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import xarray as xr
import zarr

from hydra_store.errors import (
    StoreExistsError,
    StoreFormatError,
    StoreIncompleteError,
    StoreNotFoundError,
)
from hydra_store.store.integrity import require_chunks
from hydra_store.store.location import (
    StorePath,
    check_bucket,
    exists,
    is_url,
    location_text,
    remove_tree,
    store_path,
)
from hydra_store.store.locks import check_not_written

FORMAT_VERSION = 1
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_store(path: str | os.PathLike[str]) -> bool:
    path = store_path(path)
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        group = zarr.open_group(location_text(path), mode="r", use_consolidated=False)
    except Exception:
        return False
    return "hydra_store_format" in group.attrs


def consolidate(path: str | os.PathLike[str]) -> None:
    """Write consolidated metadata so that xarray opens the store without warnings.

    zarr warns that consolidated metadata is not in the v3 spec; xarray relies on it, so the
    warning is expected here and silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(location_text(store_path(path)))


def check_output_path(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise if `path` may not receive a new store; changes nothing."""
    path = store_path(path)
    if not is_url(path):
        _check_not_nested(path)
    if not exists(path):
        if is_url(path):
            check_bucket(path)
            return
        if not path.parent.exists():
            raise StoreNotFoundError(
                f"the directory {path.parent} for the output store does not exist; create it first"
            )
        return
    if not overwrite:
        raise StoreExistsError(
            f"{path} already exists; pass --overwrite to replace it, or choose another --out"
        )
    check_not_written(path)
    if path.is_dir() and not any(path.iterdir()):
        return
    if not path.is_dir() and is_url(path):
        raise StoreExistsError(
            f"{path} is an object, not a store; refusing to delete it even with --overwrite. "
            "Choose another --out"
        )
    if not is_store(path):
        raise StoreExistsError(
            f"{path} exists and is not a hydra-store store; refusing to delete it even with "
            "--overwrite. Choose another --out"
        )


def _check_not_nested(path: Path) -> None:
    """Refuse an output inside another store (it would become part of that store's hierarchy)
    or one that holds the current directory (deleting it would pull the floor from under the
    run)."""
    resolved = path.resolve()
    for parent in resolved.parents:
        if is_store(parent):
            raise StoreExistsError(
                f"{path} is inside the store {parent}; choose an --out outside any store"
            )
    if resolved.exists() and (resolved == Path.cwd() or resolved in Path.cwd().parents):
        raise StoreExistsError(
            f"{path} holds the current directory; refusing to replace it. Choose another --out"
        )


def prepare_output_path(path: str | os.PathLike[str], overwrite: bool) -> StorePath:
    """Check the path, then delete an old store there (only with `overwrite`); returns it as a
    path object (`store_path`).

    Call this only after every input has been validated.
    """
    path = store_path(path)
    check_output_path(path, overwrite)
    if exists(path):
        remove_tree(path)
    return path


def open_group(path: str | os.PathLike[str], mode: str = "r") -> zarr.Group:
    """Open a store's root group, checking that it is a hydra-store store of a known version."""
    path = store_path(path)
    if not exists(path):
        raise StoreNotFoundError(f"no store at {path}; record one with `hydra-store record --out`")
    if not (path / "zarr.json").is_file():
        raise StoreFormatError(f"{path} is not a Zarr v3 store (no zarr.json)")
    group = zarr.open_group(location_text(path), mode=mode, use_consolidated=False)
    version = group.attrs.get("hydra_store_format")
    if version is None:
        raise StoreFormatError(f"{path} is a Zarr group but not a hydra-store store")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"{path} has store format {version}; this hydra-store reads format {FORMAT_VERSION}"
        )
    return group


def _is_int(value: object, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _valid_layout(value: object) -> bool:
    return (
        isinstance(value, dict)
        and _is_str_list(value.get("names"))
        and isinstance(value.get("shapes"), list)
        and len(value["shapes"]) == len(value["names"])
        and all(
            isinstance(shape, list) and all(_is_int(n) for n in shape) for shape in value["shapes"]
        )
    )


def _valid_dataset(value: object) -> bool:
    return (
        isinstance(value, dict)
        and _is_str_list(value.get("class_names"))
        and len(value["class_names"]) >= 1
        and isinstance(value.get("input_shape"), list)
        and all(_is_int(n, 1) for n in value["input_shape"])
    )


# What a complete store's root attributes must hold (docs/store-format.md, "Root attributes"):
# name -> (required, check).
_ROOT_ATTRIBUTES = {
    "status": (True, lambda v: isinstance(v, str)),
    "mode": (True, lambda v: isinstance(v, str)),
    "n_train": (True, lambda v: _is_int(v, 1)),
    "n_tracked": (True, _is_int),
    "n_params": (True, lambda v: _is_int(v, 1)),
    "recorded_step": (True, _is_int),
    "parameter_layout": (True, _valid_layout),
    "config": (False, lambda v: isinstance(v, dict)),
    "dataset": (False, _valid_dataset),
    "step_gradient": (False, lambda v: isinstance(v, str)),
    "projection": (False, lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str)),
    "partitions": (False, lambda v: isinstance(v, dict)),
}


def check_root_attributes(group: zarr.Group, path: str | os.PathLike[str]) -> None:
    """Refuse, with one line, a store whose root attributes are missing or of the wrong type
    (a store edited by hand or damaged), before anything reads them."""
    attrs = group.attrs
    built_in = isinstance(attrs.get("config"), dict) and "dataset" in attrs["config"]
    for name, (required, valid) in _ROOT_ATTRIBUTES.items():
        if name not in attrs:
            if required or (name == "dataset" and built_in):
                raise StoreFormatError(
                    f"{path} lacks its root attribute {name!r}; the store is damaged or was not "
                    "written by hydra-store. Record it again"
                )
            continue
        if not valid(attrs[name]):
            raise StoreFormatError(
                f"{path} has a malformed root attribute {name!r} ({attrs[name]!r:.60}); the "
                "store is damaged. Record it again"
            )


def require_complete(group: zarr.Group, path: str | os.PathLike[str]) -> None:
    """Refuse a store whose recording did not finish, or one with missing chunks (which zarr
    would read as zeros)."""
    status = group.attrs.get("status")
    if status != STATUS_COMPLETE:
        raise StoreIncompleteError(
            f"{path} has status {status!r}: its recording did not finish, so its results would "
            "be partial. Record it again"
        )
    check_root_attributes(group, path)
    require_chunks(path, group)


def open_dataset(path: str | os.PathLike[str], *, group: str | None = None) -> xr.Dataset:
    """The recording (or an analysis group) as a lazy xarray Dataset backed by dask."""
    open_group(path)
    return xr.open_zarr(location_text(store_path(path)), group=group)


@contextlib.contextmanager
def writable_group(path: str | os.PathLike[str]) -> Iterator[zarr.Group]:
    """The root group opened for writing; re-consolidates the metadata on the way out."""
    group = open_group(path, mode="r+")
    try:
        yield group
    finally:
        consolidate(path)
