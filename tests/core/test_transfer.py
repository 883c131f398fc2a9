"""Rows on their way to the store: a snapshot, whatever happens to the rows after, and what the
store writer writes from it equals the rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from hydra_store.core.transfer import DeviceToHost, HostRows, one_block_ahead
from hydra_store.store.writer import RecordingStore

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_a_cpu_snapshot_is_a_float32_copy():
    rows = torch.arange(12, dtype=torch.float64).reshape(3, 4) / 3
    block = DeviceToHost("cpu").to_host(rows)
    rows.mul_(-1)
    assert block.shape == (3, 4)
    expected = (np.arange(12).reshape(3, 4) / 3).astype(np.float32)
    np.testing.assert_array_equal(block.numpy(), expected)
    np.testing.assert_array_equal(np.asarray(block, dtype=np.float64), expected.astype(np.float64))


def test_without_a_snapshot_cpu_rows_are_not_copied():
    rows = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    block = DeviceToHost("cpu").to_host(rows, torch.float64, snapshot=False)
    rows.add_(1)  # the caller promised not to; this shows that nothing was copied
    np.testing.assert_array_equal(block.numpy(), np.arange(1, 7).reshape(2, 3))
    converted = DeviceToHost("cpu").to_host(rows, torch.float32, snapshot=False)
    rows.add_(1)  # a conversion copies anyway
    np.testing.assert_array_equal(converted.numpy(), np.arange(1, 7).reshape(2, 3))


def test_one_block_ahead_takes_the_next_block_before_handing_out_this_one():
    taken = []

    def blocks():
        for k in range(3):
            taken.append(k)
            yield k, HostRows(torch.full((1, 2), float(k)))

    handed = []
    for key, rows in one_block_ahead(blocks()):
        handed.append((key, rows.tolist(), list(taken)))
    assert handed == [
        (0, [[0.0, 0.0]], [0, 1]),
        (1, [[1.0, 1.0]], [0, 1, 2]),
        (2, [[2.0, 2.0]], [0, 1, 2]),
    ]
    assert list(one_block_ahead(iter(()))) == []


def test_the_store_writer_writes_host_rows_while_the_caller_changes_the_source(tmp_path):
    state = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    expected = state.numpy().copy()
    to_host = DeviceToHost("cpu")
    store = RecordingStore(tmp_path / "rows.zarr")

    def read_block(start: int, stop: int) -> HostRows:
        block = to_host.to_host(state[start:stop])
        state[start:stop] = 0  # training goes on changing the rows
        return block

    store.append_rows("h_history", 300, 5, read_block, dims=("checkpoint", "sample", "param"))
    store.write_rows("h", 300, 5, lambda a, b: to_host.to_host(torch.from_numpy(expected[a:b])))
    store.close()
    group = zarr.open_group(tmp_path / "rows.zarr", mode="r")
    np.testing.assert_array_equal(group["h_history"][0], expected)
    np.testing.assert_array_equal(group["h"][:], expected)
    assert float(state.abs().sum()) == 0.0


@pytest.mark.cuda
@needs_cuda
def test_a_gpu_snapshot_is_taken_before_later_kernels_change_the_rows():
    rows = torch.randn(2048, 4096, device="cuda")
    expected = rows.cpu().numpy().copy()
    block = DeviceToHost("cuda").to_host(rows)
    for _ in range(20):  # queued after the snapshot on the compute stream
        rows.mul_(1.5).add_(1.0)
    np.testing.assert_array_equal(block.numpy(), expected)
    assert block._rows.is_pinned()
