"""Results written as a whole: a subgroup of the store (e.g. `analysis/test`) is built in a
private staging directory beside its final place and swapped in by renames, so a reader sees the
old results or the new ones, never half of either. Every analysis writes through
`replace_group`.

On object storage (a store at an fsspec URL) there is no rename: the staged group is copied into
place instead, its `zarr.json` last, after the old group's `zarr.json` was deleted first. A reader
in between finds no group (an error), never a mix; a failure while the group is built leaves the
old results as they were."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from upath import UPath

from hydra_store.store.arrays import write_array
from hydra_store.store.format import consolidate
from hydra_store.store.location import StorePath, location_text, store_path
from hydra_store.store.locks import group_lock_file, hold


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def _recover(target: Path) -> None:
    """Undo what a crash can leave, under the group's lock (so no live writer owns any of it):
    the previous results moved aside (`.<name>.old-*`) with nothing in their place, between the
    two renames of a swap; and the staging directories (`.<name>.partial-*`) of analyses killed
    while they built their group."""
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(target)
    for staging in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(target: Path, staging: Path) -> None:
    if not target.exists():
        staging.rename(target)
        return
    if _exchange(staging, target):
        shutil.rmtree(staging)  # now holds the previous results
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)


def _copy_in(target: UPath, staging: UPath) -> None:
    """Object storage: replace `target` by a copy of `staging` (see the module's docstring)."""
    fs = target.fs
    if fs.exists(f"{target.path}/zarr.json"):
        fs.rm(f"{target.path}/zarr.json")
    if fs.exists(target.path):
        fs.rm(target.path, recursive=True)
    metadata = f"{staging.path}/zarr.json"
    for source in sorted(fs.find(staging.path), key=lambda f: f == metadata):
        fs.copy(source, target.path + source[len(staging.path) :])
    fs.rm(staging.path, recursive=True)


@contextlib.contextmanager
def replace_group(
    root: str | os.PathLike[str], name: str
) -> Iterator[tuple[zarr.Group, StorePath]]:
    """Yield (an empty group, its directory) in which to build the subgroup `name` of the store
    at `root`; when the block ends without an error the group replaces `name` atomically and
    the store's metadata is consolidated again (at the root only: a group's own consolidated
    metadata would hide subgroups added to it later); on an error it is deleted and `name` is left as
    it was. Paths written under the yielded directory (figures) move with it."""
    root = store_path(root)
    parts = name.split("/")
    parent = zarr.open_group(location_text(root), mode="r+", use_consolidated=False)
    for part in parts[:-1]:
        parent = parent.require_group(part)
    target = root.joinpath(*parts)
    with hold(group_lock_file(root, name), f"the group {name} of {root}"):
        staging = target.parent / f".{parts[-1]}.partial-{uuid.uuid4().hex[:8]}"
        remote = isinstance(target, UPath)
        if not remote:
            _recover(target)
        group = zarr.open_group(location_text(staging), mode="w", zarr_format=3)
        try:
            yield group, staging
        except BaseException:
            if remote:
                staging.fs.rm(staging.path, recursive=True)
            else:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if remote:
            _copy_in(target, staging)
        else:
            _swap_in(target, staging)
        consolidate(root)


def write_result_group(
    root: str | os.PathLike[str],
    name: str,
    arrays: Mapping[str, tuple[Any, tuple[str, ...], Mapping[str, Any]]],
    attrs: Mapping[str, Any],
) -> None:
    """Replace the subgroup `name` with in-memory results, atomically: `arrays` maps a variable
    name to (values, dimension names, attributes); each is written as one chunk."""
    with replace_group(root, name) as (group, _):
        group.attrs.update(dict(attrs))
        for variable, (values, dims, variable_attrs) in arrays.items():
            values = np.asarray(values)
            write_array(
                group,
                variable,
                values,
                dims,
                chunks=values.shape if values.size else None,
                attrs=variable_attrs,
            )
