"""Durable points of a recording: where `hydra-store record --resume` continues from
(docs/store-format.md, "Durable points").

A durable point is written into one of two slots, `resume/slot-0` and `resume/slot-1`, the one
the last point did not use, and committed by writing the root attribute `durable_point` last:
it names the slot, the step, the root attributes and the shape of every root array at that
point. A kill while a slot is being written leaves the attribute naming the other slot, which is
intact. Resuming cuts every root array back to the shapes the attribute lists, drops the arrays
created after it and puts the root attributes back as they were. Once the store is complete, the
slots and the attribute are deleted.

This module knows the layout, not training: the recorder fills the slots
(hydra_store/recording/durable.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import zarr

from hydra_store.errors import StoreCorruptError
from hydra_store.store.arrays import create_array, writable
from hydra_store.store.format import STATUS_RECORDING, consolidate
from hydra_store.store.integrity import require_chunks
from hydra_store.store.location import StorePath, is_url

RESUME_GROUP = "resume"
DURABLE_ATTR = "durable_point"


def read_durable_point(group: zarr.Group) -> dict[str, Any] | None:
    """The committed durable point (None when none was written)."""
    point = group.attrs.get(DURABLE_ATTR)
    return dict(point) if isinstance(point, dict) else None


def slot_group(group: zarr.Group, slot: int) -> zarr.Group:
    return group[f"{RESUME_GROUP}/slot-{slot}"]


def fresh_slot(group: zarr.Group) -> tuple[int, zarr.Group]:
    """The slot the committed point does not use, emptied: (its number, its group)."""
    point = read_durable_point(group)
    slot = 0 if point is None else 1 - int(point["slot"])
    parent = group.require_group(RESUME_GROUP)
    name = f"slot-{slot}"
    if name in parent:
        del parent[name]
    return slot, parent.create_group(name)


def write_bytes(group: zarr.Group, name: str, data: bytes) -> None:
    """A byte string as a uint8 array of one chunk (checksummed like every array)."""
    values = np.frombuffer(data, dtype=np.uint8)
    array = create_array(
        group,
        name,
        dims=("byte",),
        shape=values.shape,
        dtype=np.uint8,
        chunks=(max(1, values.size),),
    )
    array[...] = values


def read_bytes(array: zarr.Array) -> bytes:
    return np.asarray(array[...], dtype=np.uint8).tobytes()


def root_arrays(group: zarr.Group) -> list[tuple[str, zarr.Array]]:
    """The root group's arrays. (zarr warns about every other folder it meets while listing
    them: a partitioned recording's `.gradient-log` is one.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        return list(group.arrays())


def root_array_shapes(group: zarr.Group) -> dict[str, list[int]]:
    return {name: list(array.shape) for name, array in root_arrays(group)}


def commit_durable_point(path: StorePath, group: zarr.Group, point: dict[str, Any]) -> None:
    """Make `point` the store's durable point: one write of the root attributes."""
    group.attrs[DURABLE_ATTR] = point
    consolidate(path)


def cut_back(path: StorePath, group: zarr.Group, point: dict[str, Any]) -> list[str]:
    """Put the store back as it was at `point`: arrays cut to their shapes then, arrays created
    since deleted, the root attributes as they were (status `recording`); returns the names of
    the arrays deleted. Refuses a store whose arrays are shorter than at the point or miss a
    chunk within it (damaged: resuming could not make it whole)."""
    shapes = {name: tuple(shape) for name, shape in point["arrays"].items()}
    dropped = []
    for name, array in root_arrays(group):
        if name not in shapes:
            del group[name]
            dropped.append(name)
            continue
        shape = shapes[name]
        if len(shape) != array.ndim or any(a < b for a, b in zip(array.shape, shape, strict=True)):
            raise StoreCorruptError(
                f"{path} is damaged: {name!r} has shape {array.shape}, less than the "
                f"{shape} of its last durable point; record it again"
            )
        if array.shape != shape:
            writable(array).resize(shape)
    missing = sorted(set(shapes) - {name for name, _ in root_arrays(group)})
    if missing:
        raise StoreCorruptError(
            f"{path} is damaged: {missing[0]!r}, written before its last durable point, is "
            "gone; record it again"
        )
    require_chunks(path, group, list(shapes))
    _remove_partial_writes(path)
    attributes = dict(point["attributes"])
    attributes.update({"status": STATUS_RECORDING, DURABLE_ATTR: point})
    group.attrs.put(attributes)  # one write: never a root without its attributes
    consolidate(path)
    return dropped


def _remove_partial_writes(path: StorePath) -> None:
    """zarr writes each file of a local store to `<name>.<uuid>.partial`, then renames it: a
    kill in between leaves the partial file, which is never read. They are deleted."""
    if is_url(path):
        return
    for top, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                os.unlink(os.path.join(top, name))


def drop_durable_points(group: zarr.Group) -> None:
    """Delete the slots and the committed point (the recording is complete)."""
    if RESUME_GROUP in group:
        del group[RESUME_GROUP]
    if DURABLE_ATTR in group.attrs:
        del group.attrs[DURABLE_ATTR]
