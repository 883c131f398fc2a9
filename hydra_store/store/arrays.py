"""Arrays of the store's conventions, and the one function that writes a whole array."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

# Uncompressed size aimed at for one chunk of a (sample, param) array: large, whole chunks are
# what zarr writes fast (docs/design.md, "Measured facts").
CHUNK_BYTES = 32 * 2**20
# blosc-lz4 with byte shuffle: ~2.4x on real per-sample gradients at >1 GB/s (zstd, zarr's
# default, is the slowest of those measured).
FLOAT_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
# Last in every array's chain: a checksum of the encoded chunk, checked before it is
# decompressed (store/integrity.py). zarr's own default compressor for everything else.
CHECKSUM_CODEC = Crc32cCodec()
OTHER_CODEC = ZstdCodec(level=0, checksum=False)


def matrix_chunks(n_rows: int, n_cols: int, itemsize: int = 4) -> tuple[int, int]:
    """Chunk shape for a (rows, cols) array: whole rows when a row fits, ~CHUNK_BYTES each."""
    col_chunk = min(n_cols, max(1, CHUNK_BYTES // itemsize))
    row_chunk = max(1, min(n_rows, CHUNK_BYTES // (col_chunk * itemsize)))
    return row_chunk, col_chunk


def compressors_for(dtype: Any) -> tuple[Any, ...]:
    """The bytes-to-bytes codecs of an array: its compressor, then the checksum."""
    is_float = dtype is not str and np.dtype(dtype).kind == "f"
    return (FLOAT_CODEC if is_float else OTHER_CODEC, CHECKSUM_CODEC)


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
    variable-length strings for `str`, a crc32c checksum on every chunk."""
    dtype = str if dtype is str else np.dtype(dtype)
    kwargs: dict[str, Any] = {}
    kwargs["compressors"] = compressors_for(dtype)
    if fill_value is not None:
        kwargs["fill_value"] = fill_value
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks if chunks is not None else "auto",
        dimension_names=dims,
        attributes=dict(attrs or {}),
        # Every chunk is written, even one equal to the fill value: zarr's check for that
        # compares each chunk before encoding it (5% of a partition's time at 33 MB chunks),
        # and a chunk that is on disk says it was written.
        config={"write_empty_chunks": True},
        **kwargs,
    )


def writable(array: zarr.Array) -> zarr.Array:
    """The array as opened for a write: every chunk written, even one equal to the fill value.
    (`write_empty_chunks` is a run-time setting of an opened array, not stored in its metadata,
    so an array opened again from its group needs it again: a chunk of zeros left unwritten
    would look missing to `verify` and to the readers.)"""
    return array.with_config({"write_empty_chunks": True})


def write_array(
    group: zarr.Group,
    name: str,
    values: Any,
    dims: tuple[str, ...],
    *,
    chunks: tuple[int, ...] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Create `name` in `group` from in-memory `values` and write them (strings as variable-length
    strings; floats with FLOAT_CODEC)."""
    values = np.asarray(values)
    dtype: Any = values.dtype
    if values.dtype.kind in "OUT":
        dtype, values = str, values.astype(object)
    array = create_array(
        group, name, dims=dims, shape=values.shape, dtype=dtype, chunks=chunks, attrs=attrs
    )
    if values.size:
        array[...] = values
    return array
