"""The tracked-state seam: a second backend dropped into the recorder gives the same
hypergradients as the in-memory one, for the approximate and the exact recurrence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hydra_store.core.state import InMemoryTrackedState, TrackedState, state_nbytes
from hydra_store.errors import InvalidArgumentError
from tests.conftest import record_small_run


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
