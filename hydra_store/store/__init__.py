"""The store layer: the Zarr v3 format (docs/store-format.md), arrays of its conventions, the
recording writer, atomic replacement of result groups, and `describe_store` for `info`.

Knows nothing of training or analysis; everything above reads and writes stores through it.
"""

from hydra_store.store.arrays import (
    CHUNK_BYTES,
    FLOAT_CODEC,
    create_array,
    matrix_chunks,
    write_array,
)
from hydra_store.store.format import (
    FORMAT_VERSION,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_RECORDING,
    check_output_path,
    consolidate,
    is_store,
    now_iso,
    open_dataset,
    open_group,
    prepare_output_path,
    require_complete,
    writable_group,
)
from hydra_store.store.groups import replace_group, write_result_group
from hydra_store.store.location import (
    StorePath,
    is_url,
    local_scratch,
    remove_tree,
    store_path,
    tree_bytes,
)
from hydra_store.store.writer import RecordingStore

__all__ = [
    "CHUNK_BYTES",
    "FLOAT_CODEC",
    "FORMAT_VERSION",
    "STATUS_COMPLETE",
    "STATUS_FAILED",
    "STATUS_RECORDING",
    "RecordingStore",
    "StorePath",
    "check_output_path",
    "consolidate",
    "create_array",
    "is_store",
    "is_url",
    "local_scratch",
    "matrix_chunks",
    "now_iso",
    "open_dataset",
    "open_group",
    "prepare_output_path",
    "remove_tree",
    "replace_group",
    "require_complete",
    "store_path",
    "tree_bytes",
    "writable_group",
    "write_array",
    "write_result_group",
]
