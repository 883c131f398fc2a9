"""The store: a Zarr v3 group laid out so that `xr.open_zarr(path)` gives the recording as one
Dataset (format described in docs/store-format.md). Knows nothing of training."""

from __future__ import annotations

import contextlib
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from hydra_store.errors import (
    StoreExistsError,
    StoreFormatError,
    StoreIncompleteError,
    StoreNotFoundError,
)

FORMAT_VERSION = 1
STATUS_RECORDING = "recording"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

# Uncompressed size aimed at for one chunk of a (sample, param) array: large, whole chunks are
# what zarr writes fast (DESIGN.md section 5).
CHUNK_BYTES = 32 * 2**20
# blosc-lz4 with byte shuffle: ~2.4x on real per-sample gradients at >1 GB/s (zstd, zarr's
# default, is the slowest of those measured).
FLOAT_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def matrix_chunks(n_rows: int, n_cols: int, itemsize: int = 4) -> tuple[int, int]:
    """Chunk shape for a (rows, cols) array: whole rows when a row fits, ~CHUNK_BYTES each."""
    col_chunk = min(n_cols, max(1, CHUNK_BYTES // itemsize))
    row_chunk = max(1, min(n_rows, CHUNK_BYTES // (col_chunk * itemsize)))
    return row_chunk, col_chunk


def create_array(
    group: zarr.Group,
    name: str,
    *,
    dims: tuple[str, ...],
    shape: tuple[int, ...],
    dtype: Any,
    chunks: tuple[int, ...] | None = None,
    attrs: Mapping[str, Any] | None = None,
    fill_value: Any = None,
) -> zarr.Array:
    """An array of the store's conventions: `dimension_names` always, FLOAT_CODEC for floats,
    variable-length strings for `str`."""
    dtype = str if dtype is str else np.dtype(dtype)
    kwargs: dict[str, Any] = {}
    if dtype is not str and dtype.kind == "f":
        kwargs["compressors"] = FLOAT_CODEC
    if fill_value is not None:
        kwargs["fill_value"] = fill_value
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks if chunks is not None else "auto",
        dimension_names=dims,
        attributes=dict(attrs or {}),
        **kwargs,
    )


def is_store(path: Path) -> bool:
    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        group = zarr.open_group(path, mode="r", use_consolidated=False)
    except Exception:
        return False
    return "hydra_store_format" in group.attrs


def consolidate(path: Path | str) -> None:
    """Write consolidated metadata so that xarray opens the store without warnings.

    zarr warns that consolidated metadata is not in the v3 spec; xarray relies on it, so the
    warning is expected here and silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(str(path))


def check_output_path(path: Path, overwrite: bool) -> None:
    """Raise if `path` may not receive a new store; changes nothing."""
    if not path.exists():
        if not path.parent.exists():
            raise StoreNotFoundError(
                f"the directory {path.parent} for the output store does not exist; create it first"
            )
        return
    if not overwrite:
        raise StoreExistsError(
            f"{path} already exists; pass --overwrite to replace it, or choose another --out"
        )
    if path.is_dir() and not any(path.iterdir()):
        return
    if not is_store(path):
        raise StoreExistsError(
            f"{path} exists and is not a hydra-store store; refusing to delete it even with "
            "--overwrite. Choose another --out"
        )


def prepare_output_path(path: Path, overwrite: bool) -> None:
    """Check the path, then delete an old store there (only with `overwrite`).

    Call this only after every input has been validated.
    """
    check_output_path(path, overwrite)
    if path.exists():
        shutil.rmtree(path)


class RecordingStore:
    """Write side of a store during recording. All writes are appends of whole blocks."""

    def __init__(self, path: Path | str, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        prepare_output_path(self.path, overwrite)
        self.group = zarr.open_group(self.path, mode="w", zarr_format=3)
        self.group.attrs.update(
            {"hydra_store_format": FORMAT_VERSION, "status": STATUS_RECORDING, "created": now_iso()}
        )
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    # -- arrays -------------------------------------------------------------------------------
    def create_array(
        self,
        name: str,
        data: np.ndarray | None = None,
        *,
        dims: tuple[str, ...],
        shape: tuple[int, ...] | None = None,
        dtype: Any = None,
        chunks: tuple[int, ...] | None = None,
        attrs: Mapping[str, Any] | None = None,
        fill_value: Any = None,
    ) -> zarr.Array:
        if data is not None:
            data = np.asarray(data)
            shape, dtype = data.shape, data.dtype
            if data.dtype.kind in "OUT":
                dtype = str
        array = create_array(
            self.group,
            name,
            dims=dims,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            attrs=attrs,
            fill_value=fill_value,
        )
        if data is not None and data.size:
            array[...] = data
        return array

    def append(self, name: str, block: np.ndarray) -> None:
        """Append rows along the first axis; the slot axis of `batch_index` grows as needed."""
        array = self.group[name]
        block = np.asarray(block)
        if block.ndim == 2 and block.shape[1] > array.shape[1]:
            array.resize((array.shape[0], block.shape[1]))
        if block.ndim == 2 and block.shape[1] < array.shape[1]:
            padded = np.full((block.shape[0], array.shape[1]), -1, dtype=block.dtype)
            padded[:, : block.shape[1]] = block
            block = padded
        array.append(block, axis=0)

    def write_rows(
        self,
        name: str,
        n_rows: int,
        n_params: int,
        read_block: Callable[[int, int], np.ndarray],
        *,
        dims: tuple[str, str] = ("sample", "param"),
        attrs: Mapping[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Stream a (rows, param) float32 array in whole row-chunks and wait for it.

        `read_block(start, stop)` produces the rows (on the caller's thread); the zarr encode
        and write of one block runs on a background thread while the next block is produced,
        with at most two blocks in flight, so memory stays at a few chunks whatever n_rows is.
        """
        chunks = matrix_chunks(n_rows, n_params)
        array = self.create_array(
            name, dims=dims, shape=(n_rows, n_params), dtype=np.float32, chunks=chunks, attrs=attrs
        )
        self._stream(array, (), n_rows, chunks[0], read_block, progress, copy=False)
        self.wait()

    def append_rows(
        self,
        name: str,
        n_rows: int,
        n_params: int,
        read_block: Callable[[int, int], np.ndarray],
        *,
        dims: tuple[str, str, str] = ("checkpoint", "sample", "param"),
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one (rows, param) slab to a (checkpoint, rows, param) array, in the background.

        Blocks are copied before they are queued, so the caller may go on changing the rows
        it read (training continues while the slab is written); `wait()` joins the writes.
        """
        if name not in self.group:
            chunks = matrix_chunks(n_rows, n_params)
            self.create_array(
                name,
                dims=dims,
                shape=(0, n_rows, n_params),
                dtype=np.float32,
                chunks=(1, *chunks),
                attrs=attrs,
            )
        array = self.group[name]
        self.wait()
        index = array.shape[0]
        array.resize((index + 1, n_rows, n_params))
        self._stream(array, (index,), n_rows, array.chunks[1], read_block, None, copy=True)

    def _stream(self, array, prefix, n_rows, row_chunk, read_block, progress, *, copy) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hydra-write")
        for start in range(0, n_rows, row_chunk):
            stop = min(n_rows, start + row_chunk)
            block = read_block(start, stop)
            # A copy only where the caller keeps changing the rows (float64 -> float32
            # conversion copies anyway).
            block = (np.array if copy else np.asarray)(block, dtype=np.float32, order="C")
            while len(self._pending) >= 2:
                self._pending.pop(0).result()
            key = (*prefix, slice(start, stop))
            self._pending.append(self._executor.submit(array.__setitem__, key, block))
            if progress is not None:
                progress(stop, n_rows)

    def wait(self) -> None:
        """Block until every queued background write has landed (re-raising its error)."""
        while self._pending:
            self._pending.pop(0).result()

    # -- attributes and status --------------------------------------------------------------
    def update_attrs(self, attrs: Mapping[str, Any]) -> None:
        self.group.attrs.update(dict(attrs))

    def set_status(self, status: str, **extra: Any) -> None:
        self.group.attrs.update({"status": status, **extra})
        consolidate(self.path)

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


# -- read side --------------------------------------------------------------------------------


def open_group(path: Path | str, mode: str = "r") -> zarr.Group:
    """Open a store's root group, checking that it is a hydra-store store of a known version."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"no store at {path}; record one with `hydra-store record --out`")
    if not (path / "zarr.json").is_file():
        raise StoreFormatError(f"{path} is not a Zarr v3 store (no zarr.json)")
    group = zarr.open_group(path, mode=mode, use_consolidated=False)
    version = group.attrs.get("hydra_store_format")
    if version is None:
        raise StoreFormatError(f"{path} is a Zarr group but not a hydra-store store")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"{path} has store format {version}; this hydra-store reads format {FORMAT_VERSION}"
        )
    return group


def require_complete(group: zarr.Group, path: Path | str) -> None:
    status = group.attrs.get("status")
    if status != STATUS_COMPLETE:
        raise StoreIncompleteError(
            f"{path} has status {status!r}: its recording did not finish, so its results would "
            "be partial. Record it again"
        )


def open_dataset(path: Path | str, *, group: str | None = None) -> xr.Dataset:
    """The recording (or an analysis group) as a lazy xarray Dataset backed by dask."""
    open_group(path)
    return xr.open_zarr(str(path), group=group)


@contextlib.contextmanager
def writable_group(path: Path | str) -> Iterator[zarr.Group]:
    """The root group opened for writing; re-consolidates the metadata on the way out."""
    group = open_group(path, mode="r+")
    try:
        yield group
    finally:
        consolidate(path)
