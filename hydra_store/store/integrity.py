"""Whether a store's chunks are all there and intact.

Every array of a store is written with zarr v3's crc32c codec last in its chain, so a damaged
chunk (flipped bytes, a truncated file) fails its checksum before it is decompressed: an error,
never a crash in the decompressor and never silently wrong numbers. A *missing* chunk is
different: zarr reads it as the fill value, so the readers list the chunks of what they are about
to read first (`require_chunks`) and refuse a store with holes. `verify_store` does both for
every array (and `hydra-store verify` adds the replay of the trajectory).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import zarr
from upath import UPath

from hydra_store.errors import StoreCorruptError
from hydra_store.store.location import store_path

P = ParamSpec("P")
R = TypeVar("R")
CHECKSUM_ERROR = "Stored and computed checksum do not match"


def expected_chunks(array: zarr.Array) -> list[tuple[int, ...]]:
    """The grid index of every chunk the array should have (none for an empty array)."""
    if any(n == 0 for n in array.shape):
        return []
    return list(itertools.product(*(range(n) for n in array.cdata_shape)))


def present_chunk_keys(path: str | os.PathLike[str], array: zarr.Array) -> set[str]:
    """The chunk keys (`c/0/1`) stored for an array, by listing its folder or object prefix."""
    folder = store_path(path).joinpath(*array.path.split("/"))
    if isinstance(folder, UPath):
        root = folder.path.rstrip("/") + "/"
        return {f[len(root) :] for f in folder.fs.find(folder.path) if not f.endswith("zarr.json")}
    chunks = folder / "c"
    if not chunks.is_dir():
        return {"c"} if chunks.is_file() else set()
    return {
        "c/" + os.path.relpath(os.path.join(top, name), chunks).replace(os.sep, "/")
        for top, _, files in os.walk(chunks)
        for name in files
    }


def missing_chunks(path: str | os.PathLike[str], array: zarr.Array) -> list[tuple[int, ...]]:
    present = present_chunk_keys(path, array)
    encode = array.metadata.encode_chunk_key
    return [index for index in expected_chunks(array) if encode(index) not in present]


def has_checksums(array: zarr.Array) -> bool:
    return any(type(codec).__name__ == "Crc32cCodec" for codec in array.metadata.codecs)


def describe_chunk(array: zarr.Array, index: tuple[int, ...]) -> str:
    """`hypergradient[512:1024, 0:1210]`: the part of the array a chunk holds."""
    spans = []
    for i, size, n in zip(index, array.chunks, array.shape, strict=True):
        spans.append(f"{i * size}:{min(n, (i + 1) * size)}")
    return f"{array.path}[{', '.join(spans)}]"


def require_chunks(
    path: str | os.PathLike[str], group: zarr.Group, names: Iterable[str] | None = None
) -> None:
    """Refuse, with one line, a store in which any chunk of the named arrays (default: every
    array of the recording, the root group's) is missing."""
    if names is None:
        names = [name for name, _ in group.arrays()]
    for name in names:
        if name not in group:
            continue
        array = group[name]
        missing = missing_chunks(path, array)
        if missing:
            raise StoreCorruptError(
                f"{path} is damaged: {len(missing)} chunk(s) of {name!r} are missing (first: "
                f"{describe_chunk(array, missing[0])}), so they would read as zeros. Run "
                f"`hydra-store verify {path}` to list every fault, and record the run again"
            )


@contextlib.contextmanager
def checked_reads(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a chunk's failed checksum, raised anywhere below (a dask task included), into one
    named error."""
    try:
        yield
    except ValueError as error:
        if CHECKSUM_ERROR not in str(error):
            raise
        raise StoreCorruptError(
            f"{path} is damaged: a chunk failed its checksum. Run `hydra-store verify {path}` "
            "to find it, and record the run again"
        ) from None


def reads_store(function: Callable[P, R]) -> Callable[P, R]:
    """Run `function(path, ...)` under `checked_reads(path)`."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        path = args[0] if args else kwargs.get("path")
        with checked_reads(str(path)):
            return function(*args, **kwargs)

    return wrapper


@dataclass
class VerifyReport:
    """What `verify_store` found. `faults` is empty for an intact store."""

    path: str
    arrays: int = 0
    chunks: int = 0
    unchecked: list[str] = field(default_factory=list)  # arrays without checksums
    faults: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # checks that could not run, and why

    @property
    def ok(self) -> bool:
        return not self.faults


def verify_store(
    path: str | os.PathLike[str],
    root: zarr.Group,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Read every chunk of every array of the store at `path` (`root`, its opened root group;
    analysis groups included): each missing
    chunk and each chunk that fails its checksum or cannot be decoded is a fault."""
    report = VerifyReport(path=str(path))
    arrays = [array for _, array in root.members(max_depth=None) if isinstance(array, zarr.Array)]
    total = sum(len(expected_chunks(a)) for a in arrays)
    done = 0
    for array in arrays:
        report.arrays += 1
        if not has_checksums(array):
            report.unchecked.append(array.path)
        missing = set(missing_chunks(path, array))
        for index in expected_chunks(array):
            done += 1
            if index in missing:
                report.faults.append(f"missing chunk {describe_chunk(array, index)}")
            else:
                report.chunks += 1
                fault = _read_chunk(array, index)
                if fault:
                    report.faults.append(f"{fault} {describe_chunk(array, index)}")
            if progress is not None:
                progress(done, total)
    return report


def _read_chunk(array: zarr.Array, index: tuple[int, ...]) -> str | None:
    selection = tuple(
        slice(i * size, min(n, (i + 1) * size))
        for i, size, n in zip(index, array.chunks, array.shape, strict=True)
    )
    try:
        array[selection]
    except ValueError as error:
        if CHECKSUM_ERROR in str(error):
            return "checksum mismatch in chunk"
        return f"unreadable chunk ({type(error).__name__}: {error})"
    except Exception as error:  # a decoder's own error: the chunk cannot be decoded
        return f"unreadable chunk ({type(error).__name__}: {error})"
    return None
