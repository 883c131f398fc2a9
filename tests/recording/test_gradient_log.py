"""The gradient log: each partition reads back exactly the records written for its rows, in
step order, across flushes; a missing or truncated log is refused."""

from __future__ import annotations

import numpy as np
import pytest

from hydra_store.errors import StoreFormatError
from hydra_store.recording.gradient_log import GradientLogReader, GradientLogWriter


def test_each_partition_reads_back_its_own_records_in_step_order(tmp_path):
    rng = np.random.default_rng(0)
    writer = GradientLogWriter(
        tmp_path, rows_per_partition=4, n_partitions=3, width=5, dtype=np.float64
    )
    written = []  # (step, row, gradient) of every record, the naive copy
    for step in range(1, 31):
        rows = rng.choice(10, size=rng.integers(1, 6), replace=True)  # repeats allowed
        gradients = rng.normal(size=(rows.size, 5))
        writer.add(step, rows, gradients)
        written += [(step, int(r), g) for r, g in zip(rows, gradients, strict=True)]
        if step % 7 == 0:
            writer.flush()
    writer.flush()
    for partition in range(3):
        reader = GradientLogReader(tmp_path, partition, width=5, dtype=np.float64)
        got_steps, got_rows, got = [], [], []
        for last in (10, 10, 25, 30):  # blocks of steps; a repeated bound reads nothing new
            steps, rows, gradients = reader.until(last)
            assert (steps <= last).all()
            got_steps += list(steps)
            got_rows += list(rows)
            got.append(gradients)
        reader.close()
        mine = [(s, r - 4 * partition, g) for s, r, g in written if r // 4 == partition]
        assert got_steps == [s for s, _, _ in mine] and got_rows == [r for _, r, _ in mine]
        np.testing.assert_array_equal(np.concatenate(got), np.array([g for _, _, g in mine]))


def test_a_missing_or_truncated_log_is_refused(tmp_path):
    writer = GradientLogWriter(
        tmp_path, rows_per_partition=2, n_partitions=2, width=3, dtype=np.float32
    )
    writer.add(1, np.array([0, 3]), np.ones((2, 3)))
    writer.flush()
    empty = GradientLogReader(tmp_path, 1, width=3, dtype=np.float32)  # touched, one record
    assert empty.until(5)[2].shape == (1, 3)
    with pytest.raises(StoreFormatError, match=r"gradient log of partition 2 .* is missing"):
        GradientLogReader(tmp_path, 2, width=3, dtype=np.float32)
    gradients = tmp_path / "partition-000000.gradients"
    gradients.write_bytes(gradients.read_bytes()[:-4])
    with pytest.raises(StoreFormatError, match="partition 0 is truncated"):
        GradientLogReader(tmp_path, 0, width=3, dtype=np.float32)
