"""The tracked-state seam: a second backend dropped into the recorder gives the same
hypergradients as the in-memory one, for the approximate and the exact recurrence. The
in-memory state takes its rows on any device (on a GPU: tests marked `cuda`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hydra_store.core.state import InMemoryTrackedState, TrackedState, state_nbytes
from hydra_store.errors import InvalidArgumentError
from tests.conftest import record_small_run
from tests.core.test_host_staged_state import play, random_calls

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class NumpyRowState(TrackedState):
    """A deliberately different backend: one numpy array per row, updated row by row with plain
    numpy arithmetic (no numba, no torch in-place ops), counting the calls it gets."""

    def __init__(self, n_rows, width, *, has_momentum, dtype, device):
        self.n_rows, self.width, self.has_momentum = n_rows, width, has_momentum
        self.dtype, self.device = dtype, torch.device(device)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.h = [np.zeros(width, np_dtype) for _ in range(n_rows)]
        self.m = [np.zeros(width, np_dtype) for _ in range(n_rows)]
        self.calls = {"update_rows": 0, "write_rows": 0}

    def update_rows(self, rows, transition, injection=None, gradients=None):
        self.calls["update_rows"] += 1
        for k, r in enumerate(rows.tolist()):
            (a, b), (c, d) = transition[k].tolist()
            h, m = self.h[r], self.m[r]
            if not self.has_momentum:
                b = c = d = 0.0
            new_h, new_m = a * h + b * m, c * h + d * m
            if gradients is not None:
                g = gradients[k].detach().numpy()
                new_h = new_h + float(injection[k, 0]) * g
                new_m = new_m + float(injection[k, 1]) * g
            self.h[r], self.m[r] = new_h, new_m

    def read_rows(self, start, stop):
        return torch.from_numpy(np.stack(self.h[start:stop]))

    def read_momentum_rows(self, start, stop):
        return torch.from_numpy(np.stack(self.m[start:stop]))

    def write_rows(self, start, stop, h, m):
        self.calls["write_rows"] += 1
        for k in range(stop - start):
            self.h[start + k] = h[k].detach().numpy().copy()
            if m is not None:
                self.m[start + k] = m[k].detach().numpy().copy()


def test_a_second_state_backend_gives_the_same_hypergradients(tmp_path):
    built: list[NumpyRowState] = []

    def factory(n_rows, width, **kwargs):
        built.append(NumpyRowState(n_rows, width, **kwargs))
        return built[-1]

    _, _, _, h, h_exact = record_small_run(tmp_path / "memory.zarr")
    _, _, _, h2, h2_exact = record_small_run(tmp_path / "numpy.zarr", state_factory=factory)
    assert len(built) == 2  # one state per recurrence (mode "both")
    assert built[0].calls["update_rows"] > 0 and built[1].calls["write_rows"] > 0
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h2_exact, h_exact, rtol=1e-12, atol=1e-14)
    assert float(h.abs().max()) > 0


def test_in_memory_state_write_and_read_rows():
    state = InMemoryTrackedState(4, 3, has_momentum=True, dtype=torch.float64)
    h = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    state.write_rows(1, 3, h, -h)
    torch.testing.assert_close(state.read_rows(1, 3), h)
    torch.testing.assert_close(state.read_momentum_rows(1, 3), -h)
    assert float(state.read_rows(0, 1).abs().sum()) == 0.0
    assert state.nbytes == state_nbytes(4, 3, True, torch.float64) == 4 * 3 * 8 * 2


def test_an_empty_state_is_refused():
    with pytest.raises(InvalidArgumentError, match="at least one row"):
        InMemoryTrackedState(0, 3, has_momentum=False)


@pytest.mark.parametrize("has_momentum", [True, False])
def test_rows_in_host_memory_reach_a_state_on_another_device(has_momentum):
    """A GPU's index_select and index_copy_ refuse row indices in host memory, and so does the
    meta device's index_copy_ (shapes only, no values): the rows are moved to the state."""
    state = InMemoryTrackedState(5, 3, has_momentum=has_momentum, device="meta")
    rows = torch.tensor([4, 1])
    transition = torch.eye(2, dtype=torch.float64).repeat(2, 1, 1)
    injection = torch.ones(2, 2, dtype=torch.float64)
    state.update_rows(rows, transition, injection, torch.ones(2, 3, device="meta"))
    state.update_rows(rows, transition)
    assert state.read_rows(0, 5).device.type == "meta"
    assert state.read_momentum_rows(0, 5).shape == (5, 3)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("has_momentum", [True, False])
@pytest.mark.parametrize("width", [7, InMemoryTrackedState.ROWWISE_MIN_PARAMS])
def test_on_a_gpu_rows_on_either_device_give_the_cpu_state(has_momentum, width):
    """A state on the GPU given rows in host memory (block and row-by-row updates), and a state
    on the CPU given rows on the GPU, equal the CPU state given CPU rows."""
    n_rows = 11
    calls = random_calls(n_rows, width, steps=40, seed=width + has_momentum)
    options = dict(has_momentum=has_momentum, dtype=torch.float64)
    expected = play(InMemoryTrackedState(n_rows, width, **options), calls)
    gradients_on_gpu = [
        (*c[:4], None if c[4] is None else c[4].cuda()) if c[0] == "update" else c for c in calls
    ]
    rows_on_gpu = [(c[0], c[1].cuda(), *c[2:]) if c[0] == "update" else c for c in calls]
    on_gpu = play(InMemoryTrackedState(n_rows, width, device="cuda", **options), gradients_on_gpu)
    on_cpu = play(InMemoryTrackedState(n_rows, width, **options), rows_on_gpu)
    assert len(on_gpu) == len(on_cpu) == len(expected) > 2
    for gpu, cpu, want in zip(on_gpu, on_cpu, expected, strict=True):
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cpu, want, rtol=0, atol=0)
    assert float(expected[-2].abs().max()) > 1
