"""Where a store lives: a local directory, or an fsspec URL (`s3://bucket/run.zarr`,
`gs://...`, `memory://...`) for object storage.

Everything that names a store goes through `store_path`, which gives a `pathlib.Path` for a
local store and a `upath.UPath` (fsspec's pathlib-compatible path, universal-pathlib) for a URL,
so that the store layer joins, tests and lists paths the same way in both. Credentials and
endpoints come from the file system's own configuration: for S3, the usual `AWS_*` environment
variables (`AWS_ENDPOINT_URL` for an S3-compatible server) or `~/.aws`.

Object stores have no rename: what a local store does atomically by renaming a directory
(`replace_group`) is done there by copying objects, in an order that keeps a half-copied group
unreadable rather than wrong (store/groups.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from upath import UPath

from hydra_store.errors import StoreNotFoundError

StorePath = Path | UPath


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL other than a plain local file (`file://` is local)."""
    if isinstance(path, UPath):
        return path.protocol not in ("", "file", "local")
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def store_path(path: str | os.PathLike[str]) -> StorePath:
    """The store's location as a path object: `Path` for local, `UPath` for a URL."""
    if isinstance(path, UPath):
        return path if is_url(path) else Path(path.path)
    if is_url(path):
        return UPath(os.fspath(path))
    text = os.fspath(path)
    return Path(text.removeprefix("file://"))


def location_text(path: StorePath) -> str:
    """What zarr, xarray and the messages are given: the URL, or the local path."""
    return str(path)


def exists(path: StorePath) -> bool:
    """Whether anything is at `path`; an unreachable object store raises one clear error."""
    if not isinstance(path, UPath):
        return path.exists()
    try:
        return path.exists()
    except Exception as error:
        raise StoreNotFoundError(
            f"cannot reach {path}: {type(error).__name__}: {error}. Check the URL and the "
            "storage's credentials and endpoint (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY)"
        ) from None


def check_bucket(path: UPath) -> None:
    """Refuse a URL whose bucket (its first path component) does not exist: object stores
    create no bucket on write, and would fail only at the first chunk."""
    bucket = path.path.strip("/").split("/")[0]
    if path.protocol in ("memory",) or not bucket:
        return
    if not exists(UPath(f"{path.protocol}://{bucket}", **path.storage_options)):
        raise StoreNotFoundError(f"the bucket {bucket!r} of {path} does not exist; create it first")


def remove_tree(path: StorePath) -> None:
    """Delete a directory (or an object prefix) and everything under it."""
    if isinstance(path, UPath):
        if path.exists():
            path.fs.rm(path.path, recursive=True)
        return
    shutil.rmtree(path)


def tree_bytes(path: StorePath) -> int:
    """The bytes stored under `path`."""
    if isinstance(path, UPath):
        return int(path.fs.du(path.path, total=True))
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def local_scratch(path: StorePath, name: str) -> Path:
    """A local folder that belongs to the store at `path`: inside it for a local store, and in
    the temporary directory (`TMPDIR`) under a name derived from the URL for a remote one. For
    files that are appended in small pieces and read back once (the gradient log), which an
    object store handles badly."""
    if isinstance(path, UPath):
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"hydra-store-{digest}" / name
    return Path(path) / name
