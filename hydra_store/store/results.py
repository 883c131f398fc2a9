"""Results stores: the analysis groups of a recording written to a separate store (`--out` of
`analyze`, `compare`, `validate`; `out=` in Python) instead of into the recording.

A recording may be read-only (an archive, a shared volume, an object store without write
access), or one may want several sets of results of one recording side by side. A results store
is a Zarr group whose root says whose results it holds (`hydra_store_results.recording`: the
recording's location, its creation time, size and step count); its subgroups have the layout
they have inside a recording (`analysis/<test set>`, `reverse/<test set>`, ...), so the same
readers serve both. Nothing is ever written into the recording when a results store is given.
"""

from __future__ import annotations

import os
from typing import Any

import zarr

from hydra_store.errors import StoreExistsError, StoreFormatError
from hydra_store.store.format import FORMAT_VERSION, consolidate, open_group
from hydra_store.store.location import (
    StorePath,
    check_bucket,
    exists,
    is_url,
    location_text,
    store_path,
)

RESULTS_ATTRIBUTE = "hydra_store_results"


def recording_identity(recording: zarr.Group, path: StorePath) -> dict[str, Any]:
    """What ties a results store to its recording: where it was and what it is."""
    attrs = recording.attrs
    return {
        "path": location_text(path),
        "created": attrs.get("created"),
        "n_train": attrs.get("n_train"),
        "n_params": attrs.get("n_params"),
        "recorded_step": attrs.get("recorded_step"),
    }


def _same_recording(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("created", "n_train", "n_params", "recorded_step")
    return all(a.get(k) == b.get(k) for k in keys)


def results_root(
    recording: str | os.PathLike[str], out: str | os.PathLike[str] | None, *, create: bool = True
) -> StorePath:
    """Where the result groups of `recording` live: the recording itself (`out` None), or the
    results store `out`, created when absent (with `create`) and checked to hold this
    recording's results when present."""
    path = store_path(recording)
    if out is None:
        return path
    target = store_path(out)
    if location_text(target) == location_text(path):
        return path
    if not is_url(target) and not is_url(path):
        resolved, home = target.resolve(), path.resolve()
        if home in resolved.parents or resolved in home.parents:
            raise StoreExistsError(
                f"the results store {target} may not lie inside the recording {path} or hold "
                "it; choose a path outside it"
            )
    identity = recording_identity(open_group(path), path)
    if exists(target):
        _check_results_store(target, identity, path)
        return target
    if not create:
        raise StoreFormatError(
            f"no results store at {target}; write one with `--out {target}` first"
        )
    if is_url(target):
        check_bucket(target)
    elif not target.parent.exists():
        raise StoreExistsError(
            f"the directory {target.parent} for the results store does not exist; create it first"
        )
    group = zarr.open_group(location_text(target), mode="w-", zarr_format=3)
    group.attrs.update(
        {"hydra_store_format": FORMAT_VERSION, RESULTS_ATTRIBUTE: {"recording": identity}}
    )
    consolidate(target)
    return target


def _check_results_store(target: StorePath, identity: dict[str, Any], path: StorePath) -> None:
    if not (target / "zarr.json").is_file():
        raise StoreExistsError(
            f"{target} exists and is not a hydra-store results store; choose another --out"
        )
    group = zarr.open_group(location_text(target), mode="r", use_consolidated=False)
    held = (group.attrs.get(RESULTS_ATTRIBUTE) or {}).get("recording")
    if not isinstance(held, dict):
        kind = "a recording" if "status" in group.attrs else "not a hydra-store results store"
        raise StoreExistsError(f"{target} is {kind}; give --out a new path or a results store")
    if not _same_recording(held, identity):
        raise StoreExistsError(
            f"{target} holds the results of another recording ({held.get('path')}, recorded "
            f"{held.get('created')}), not of {path}; give --out a new path"
        )
