"""The write side of a store during recording: whole-block appends, and hypergradient rows
streamed in whole chunks on a background thread."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from os import PathLike
from typing import Any

import numpy as np
import zarr

from hydra_store.core.transfer import HostRows
from hydra_store.errors import InvalidArgumentError
from hydra_store.store.arrays import create_array, matrix_chunks, writable, write_array
from hydra_store.store.durable import drop_durable_points
from hydra_store.store.format import (
    FORMAT_VERSION,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_RECORDING,
    check_output_path,
    consolidate,
    now_iso,
    open_group,
    prepare_output_path,
)
from hydra_store.store.location import location_text, store_path
from hydra_store.store.locks import hold, store_lock_file


class RecordingStore:
    """Write side of a store during recording. All writes are appends of whole blocks."""

    def __init__(
        self, path: str | PathLike[str], *, overwrite: bool = False, resume: bool = False
    ) -> None:
        """A new store at `path`; with `resume`, the existing store there, opened to go on
        writing it (`record --resume`: the caller cuts it back to its last durable point)."""
        # The lock is taken before an old store is deleted, and held until the status is final.
        if not resume:
            check_output_path(path, overwrite)
        self._lock = hold(store_lock_file(store_path(path)), f"the store {path}")
        self._lock.__enter__()
        try:
            if resume:
                self.path = store_path(path)
                self.group = open_group(self.path, mode="r+")
                if self.group.attrs.get("status") == STATUS_COMPLETE:
                    raise InvalidArgumentError(f"{path} is complete; there is nothing to resume")
            else:
                self.path = prepare_output_path(path, overwrite)
        except BaseException:
            self.release()
            raise
        if not resume:
            self.group = zarr.open_group(location_text(self.path), mode="w", zarr_format=3)
            self.group.attrs.update(
                {
                    "hydra_store_format": FORMAT_VERSION,
                    "status": STATUS_RECORDING,
                    "created": now_iso(),
                }
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
            return write_array(self.group, name, data, dims, chunks=chunks, attrs=attrs)
        return create_array(
            self.group,
            name,
            dims=dims,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            attrs=attrs,
            fill_value=fill_value,
        )

    def append(self, name: str, block: np.ndarray) -> None:
        """Append rows along the first axis; the slot axis of `batch_index` grows as needed."""
        array = writable(self.group[name])
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
        width: int,
        read_block: Callable[[int, int], np.ndarray],
        *,
        dims: tuple[str, str] = ("sample", "param"),
        attrs: Mapping[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Stream a (rows, param) float32 array in whole row-chunks and wait for it.

        `read_block(start, stop)` produces the rows (on the caller's thread): a numpy array, or
        `HostRows` still being copied from a GPU (waited for on the writer's thread). The zarr
        encode and write of one block runs on a background thread while the next block is
        produced, with at most two blocks in flight, so memory stays at a few chunks whatever
        n_rows is.
        """
        chunks = matrix_chunks(n_rows, width)
        array = self.create_array(
            name, dims=dims, shape=(n_rows, width), dtype=np.float32, chunks=chunks, attrs=attrs
        )
        self._stream(array, (), n_rows, chunks[0], read_block, progress, copy=False)
        self.wait()

    def append_rows(
        self,
        name: str,
        n_rows: int,
        width: int,
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
            chunks = matrix_chunks(n_rows, width)
            self.create_array(
                name,
                dims=dims,
                shape=(0, n_rows, width),
                dtype=np.float32,
                chunks=(1, *chunks),
                attrs=attrs,
            )
        array = writable(self.group[name])
        self.wait()
        index = array.shape[0]
        array.resize((index + 1, n_rows, width))
        self._stream(array, (index,), n_rows, array.chunks[1], read_block, None, copy=True)

    def _stream(self, array, prefix, n_rows, row_chunk, read_block, progress, *, copy) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hydra-write")
        for start in range(0, n_rows, row_chunk):
            stop = min(n_rows, start + row_chunk)
            block = read_block(start, stop)
            if not isinstance(block, HostRows):
                # A copy only where the caller keeps changing the rows (float64 -> float32
                # conversion copies anyway); HostRows are a snapshot already.
                block = (np.array if copy else np.asarray)(block, dtype=np.float32, order="C")
            while len(self._pending) >= 2:
                self._pending.pop(0).result()
            key = (*prefix, slice(start, stop))
            self._pending.append(self._executor.submit(_write_block, array, key, block))
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
        """Set the status; a final one (complete, failed) also releases the store's lock. A
        complete store's durable points are deleted (after the status: a kill in between
        leaves a complete store with a spare copy of its state, never an incomplete one with
        none)."""
        self.group.attrs.update({"status": status, **extra})
        if status == STATUS_COMPLETE:
            drop_durable_points(self.group)
        consolidate(self.path)
        if status in (STATUS_COMPLETE, STATUS_FAILED):
            self.release()

    def release(self) -> None:
        """Release the store's lock (at the final status, or when a resume is refused)."""
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def _write_block(array: zarr.Array, key: tuple, block: np.ndarray | HostRows) -> None:
    if isinstance(block, HostRows):
        block = np.asarray(block.numpy(), dtype=np.float32, order="C")
    array[key] = block
