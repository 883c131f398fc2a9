"""The gradient log of a partitioned approximate recording: the (projected) per-sample gradients
training computed anyway, appended to one pair of files per partition as training goes, so that
each partition later reads back exactly its own samples' gradients, in step order, instead of
computing them again.

Files, under `<store>/.gradient-log/` (deleted once every partition is recorded); for a store on
object storage, under a folder of the local temporary directory named after the store's URL
(`store.location.local_scratch`), since an object store cannot append:

- `partition-NNNNNN.index`: int64 pairs (step, row), row counted within the partition;
- `partition-NNNNNN.gradients`: rows of `width` values in the tracked state's dtype (float32,
  or float64 for a float64 model), one per index pair.

Plain files, not zarr arrays: they are written once, appended in order, read once front to back,
and thrown away; zarr's chunk bookkeeping would only add a read-modify-write per append.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from hydra_store.errors import StoreFormatError
from hydra_store.store.location import is_url, local_scratch, store_path

LOG_FOLDER = ".gradient-log"


def log_folder(store: str | os.PathLike[str]) -> Path:
    return local_scratch(store_path(store), LOG_FOLDER)


def _files(folder: Path, partition: int) -> tuple[Path, Path]:
    stem = folder / f"partition-{partition:06d}"
    return stem.with_suffix(".index"), stem.with_suffix(".gradients")


class GradientLogWriter:
    """Buffers (step, row, gradient) records by partition and appends them on `flush`."""

    def __init__(
        self,
        folder: Path,
        rows_per_partition: int,
        n_partitions: int,
        width: int,
        dtype: np.dtype,
    ) -> None:
        self.folder, self.rows, self.width = Path(folder), rows_per_partition, width
        self.dtype = np.dtype(dtype)
        self.folder.mkdir(parents=True, exist_ok=True)
        for partition in range(n_partitions):  # a partition no batch reached has empty files
            for file in _files(self.folder, partition):
                file.touch()
        self._index: dict[int, list[np.ndarray]] = {}
        self._gradients: dict[int, list[np.ndarray]] = {}
        self.buffered_bytes = 0

    def add(self, step: int, rows: np.ndarray, gradients: np.ndarray) -> None:
        """Records of one step: tracked `rows` (R,) of the whole selection, `gradients` (R, W)."""
        partitions = rows // self.rows
        for partition in np.unique(partitions):
            mine = partitions == partition
            local = rows[mine] - partition * self.rows
            pairs = np.stack([np.full(local.size, step, dtype=np.int64), local], axis=1)
            self._index.setdefault(int(partition), []).append(pairs)
            block = np.ascontiguousarray(gradients[mine], dtype=self.dtype)
            self._gradients.setdefault(int(partition), []).append(block)
            self.buffered_bytes += block.nbytes + pairs.nbytes

    def flush(self) -> None:
        for partition, pairs in self._index.items():
            index_file, gradient_file = _files(self.folder, partition)
            with open(index_file, "ab") as handle:
                handle.write(np.concatenate(pairs).tobytes())
            with open(gradient_file, "ab") as handle:
                for block in self._gradients[partition]:
                    handle.write(block.tobytes())
        self._index, self._gradients = {}, {}
        self.buffered_bytes = 0


class GradientLogReader:
    """One partition's records, read front to back in blocks of steps."""

    def __init__(self, folder: Path, partition: int, width: int, dtype: np.dtype) -> None:
        index_file, gradient_file = _files(Path(folder), partition)
        if not (index_file.is_file() and gradient_file.is_file()):
            raise StoreFormatError(
                f"the gradient log of partition {partition} ({gradient_file}) is missing: it "
                "is deleted once every partition is recorded, and a partition cannot be "
                "recorded without it; record the run again"
            )
        self.width, self.dtype = width, np.dtype(dtype)
        self.index = np.fromfile(index_file, dtype=np.int64).reshape(-1, 2)
        expected = self.index.shape[0] * self.width * self.dtype.itemsize
        if gradient_file.stat().st_size != expected:
            raise StoreFormatError(
                f"the gradient log of partition {partition} is truncated ({gradient_file}: "
                f"{gradient_file.stat().st_size} bytes, {expected} expected); record the run "
                "again"
            )
        # Held open across `until` calls (the log is read front to back); `close` ends it.
        self._handle = open(gradient_file, "rb")  # noqa: SIM115
        self._position = 0

    def until(self, last_step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The records of the steps up to `last_step` not read yet: (steps, rows, gradients)."""
        stop = int(np.searchsorted(self.index[:, 0], last_step, side="right"))
        start, self._position = self._position, stop
        count = stop - start
        if count == 0:
            return (
                self.index[start:stop, 0],
                self.index[start:stop, 1],
                np.empty((0, self.width), dtype=self.dtype),
            )
        gradients = np.fromfile(self._handle, dtype=self.dtype, count=count * self.width)
        return self.index[start:stop, 0], self.index[start:stop, 1], gradients.reshape(count, -1)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


def log_records(folder: Path, n_partitions: int) -> np.ndarray:
    """How many records each partition's files hold (what a durable point notes after a
    flush)."""
    return np.array(
        [_files(Path(folder), p)[0].stat().st_size // 16 for p in range(n_partitions)],
        dtype=np.int64,
    )


def cut_log(folder: Path, records: np.ndarray, width: int, dtype: np.dtype) -> None:
    """Cut every partition's files back to `records` records: what was appended after a durable
    point is recorded again when the run resumes from it."""
    itemsize = np.dtype(dtype).itemsize
    for partition, count in enumerate(np.asarray(records, dtype=np.int64).tolist()):
        index_file, gradient_file = _files(Path(folder), partition)
        sizes = {index_file: count * 16, gradient_file: count * width * itemsize}
        for file, size in sizes.items():
            if not file.is_file() or file.stat().st_size < size:
                raise StoreFormatError(
                    f"the gradient log of partition {partition} ({file}) is missing or shorter "
                    "than at the recording's last durable point, so the recording cannot be "
                    "resumed; record it again"
                )
            os.truncate(file, size)


def remove_log(store: str | os.PathLike[str]) -> None:
    folder = log_folder(store)
    shutil.rmtree(folder.parent if is_url(store) else folder, ignore_errors=True)
