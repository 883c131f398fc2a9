"""The host-staged state (a state in host memory while a GPU computes): every update, read and
write gives what the in-memory state gives, whatever the order of calls, the rows shared between
consecutive updates, and the number of staging blocks an update is split into; recorded through
the recorder it gives the same hypergradients. On a GPU (tests marked `cuda`) it equals the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hydra_store.core.host_staged_state import HostStagedTrackedState
from hydra_store.core.state import InMemoryTrackedState
from hydra_store.errors import InvalidArgumentError
from tests.conftest import record_small_run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_calls(n_rows: int, width: int, steps: int, seed: int):
    """Updates with and without gradients (rows distinct within a call, often shared with the
    previous call), with reads and writes in between."""
    rng = np.random.default_rng(seed)
    calls = []
    for _ in range(steps):
        kind = rng.choice(["update", "transition", "read", "write"], p=[0.55, 0.2, 0.15, 0.1])
        if kind in ("update", "transition"):
            rows = rng.choice(n_rows, size=int(rng.integers(1, n_rows + 1)), replace=False)
            transition = torch.from_numpy(rng.normal(size=(rows.size, 2, 2)))
            injection = torch.from_numpy(rng.normal(size=(rows.size, 2)))
            gradients = torch.from_numpy(rng.normal(size=(rows.size, width)))
            if kind == "transition":
                injection = gradients = None
            calls.append(("update", torch.from_numpy(rows), transition, injection, gradients))
        elif kind == "read":
            start = int(rng.integers(0, n_rows))
            calls.append(("read", start, int(rng.integers(start + 1, n_rows + 1))))
        else:
            start = int(rng.integers(0, n_rows))
            stop = int(rng.integers(start + 1, n_rows + 1))
            h = torch.from_numpy(rng.normal(size=(stop - start, width)))
            calls.append(("write", start, stop, h, -2 * h))
    return calls


def play(state, calls) -> list[torch.Tensor]:
    reads = []
    for call in calls:
        if call[0] == "update":
            state.update_rows(*call[1:])
        elif call[0] == "read":
            reads.append(state.read_rows(*call[1:]).clone())
            reads.append(state.read_momentum_rows(*call[1:]).clone())
        else:
            state.write_rows(*call[1:])
    reads.append(state.read_rows(0, state.n_rows).clone())
    reads.append(state.read_momentum_rows(0, state.n_rows).clone())
    return reads


@pytest.mark.parametrize("has_momentum", [True, False])
@pytest.mark.parametrize("staging_rows", [1, 3, 64])
def test_every_call_gives_what_the_in_memory_state_gives(has_momentum, staging_rows):
    n_rows, width = 11, 7
    calls = random_calls(n_rows, width, steps=60, seed=staging_rows + has_momentum)
    options = dict(has_momentum=has_momentum, dtype=torch.float64)
    staged = HostStagedTrackedState(
        n_rows, width, staging_bytes=staging_rows * width * 8, **options
    )
    assert staged.block_rows == min(staging_rows, n_rows)
    expected = play(InMemoryTrackedState(n_rows, width, **options), calls)
    got = play(staged, calls)
    assert len(got) == len(expected) > 2
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert float(expected[-2].abs().max()) > 1


def test_an_update_reaches_the_host_rows_before_any_other_call_sees_them():
    state = HostStagedTrackedState(3, 2, has_momentum=True, dtype=torch.float64)
    state.write_rows(0, 3, torch.ones(3, 2, dtype=torch.float64), None)
    rows = torch.tensor([2, 0])
    transition = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]] * 2, dtype=torch.float64)
    state.update_rows(rows, transition)
    state.update_rows(torch.tensor([0]), transition[:1])  # row 0 again: its first update first
    h = state.read_rows(0, 3)
    assert h[:, 0].tolist() == [4.0, 1.0, 2.0]


def test_the_recorder_gives_the_same_hypergradients_with_the_state_in_host_memory(tmp_path):
    """Both recurrences (the exact one too: every row crosses at every step) through the
    recorder, against the in-memory state."""
    _, _, _, h, h_exact = record_small_run(tmp_path / "memory.zarr")
    _, _, _, h2, h2_exact = record_small_run(
        tmp_path / "host.zarr", state_factory=HostStagedTrackedState
    )
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h2_exact, h_exact, rtol=1e-12, atol=1e-14)
    assert float(h.abs().max()) > 0


def test_bad_sizes_are_refused():
    with pytest.raises(InvalidArgumentError, match="at least one row and one column, got 0x3"):
        HostStagedTrackedState(0, 3, has_momentum=False)
    with pytest.raises(InvalidArgumentError, match="staging_bytes must be positive"):
        HostStagedTrackedState(2, 3, has_momentum=False, staging_bytes=0)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("has_momentum", [True, False])
def test_on_a_gpu_it_equals_the_in_memory_state_there(has_momentum):
    n_rows, width = 40, 300
    calls = random_calls(n_rows, width, steps=80, seed=5)
    gpu_calls = [
        (c[0], c[1], c[2], c[3], None if c[4] is None else c[4].cuda()) if c[0] == "update" else c
        for c in calls
    ]
    options = dict(has_momentum=has_momentum, dtype=torch.float64, device="cuda")
    staged = HostStagedTrackedState(n_rows, width, staging_bytes=7 * width * 8, **options)
    assert staged.h.is_pinned() is False and staged._copy_stream is not None
    got = play(staged, gpu_calls)
    expected = play(InMemoryTrackedState(n_rows, width, **options), gpu_calls)
    for a, b in zip(got, expected, strict=True):
        assert a.device.type == "cpu" and b.device.type == "cuda"  # reads come from the host
        torch.testing.assert_close(a, b.cpu(), rtol=1e-12, atol=1e-12)
    assert all(buffer.is_pinned() for buffer in staged._staging.values())
