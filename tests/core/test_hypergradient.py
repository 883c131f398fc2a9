"""The lazy approximate recurrence against a naive dense one, and the exact one against HVPs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hydra_store.core.hypergradient import ApproximateHypergradient, TrackedSelection
from hydra_store.core.sgd import SGDSettings, read_sgd_settings
from hydra_store.core.state import InMemoryTrackedState
from hydra_store.errors import InvalidArgumentError, UnsupportedOptimizerError


def naive_dense_recurrence(n_train, tracked, batches, gradients, settings_per_step, momentum):
    """Every tracked sample updated at every step, straight from the recurrence in docs/design.md, "The math"."""
    n_params = gradients[0].shape[1]
    h = np.zeros((len(tracked), n_params))
    m = np.zeros((len(tracked), n_params))
    row_of = {int(i): r for r, i in enumerate(tracked)}
    for batch, grads, s in zip(batches, gradients, settings_per_step, strict=True):
        injection = np.zeros_like(h)
        for slot, i in enumerate(batch):
            if int(i) in row_of:
                injection[row_of[int(i)]] += (n_train / len(batch)) * grads[slot]
        m = s.momentum * m + s.weight_decay * h + injection
        h = h - s.lr * m
    return h


def random_trajectory(n_train, batch_size, epochs, n_params, seed, momentum=0.9):
    rng = np.random.default_rng(seed)
    batches, grads, settings = [], [], []
    lr = 0.1
    for epoch in range(epochs):
        order = rng.permutation(n_train)
        for start in range(0, n_train, batch_size):
            batch = order[start : start + batch_size]
            batches.append(batch)
            grads.append(rng.standard_normal((batch.size, n_params)))
            settings.append(SGDSettings(lr=lr, momentum=momentum, weight_decay=0.01))
            lr *= 0.97  # a learning rate that changes every step
        if epoch == 1:
            lr *= 0.5
    return batches, grads, settings


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("max_window", [4096, 3])
def test_lazy_equals_naive_dense(momentum, max_window):
    n_train, batch_size, n_params = 37, 8, 11  # 37 = 4 full batches + a partial one of 5
    batches, grads, settings = random_trajectory(n_train, batch_size, 4, n_params, 0, momentum)
    tracked = np.array([0, 3, 5, 8, 13, 21, 34, 36])
    state = InMemoryTrackedState(
        tracked.size, n_params, has_momentum=momentum != 0, dtype=torch.float64
    )
    lazy = ApproximateHypergradient(
        state, TrackedSelection(n_train, tracked), max_window=max_window
    )
    for batch, g, s in zip(batches, grads, settings, strict=True):
        lazy.step(batch, torch.from_numpy(g), s)
    got = lazy.hypergradient_rows(0, tracked.size).numpy()
    want = naive_dense_recurrence(n_train, tracked, batches, grads, settings, momentum)
    assert np.abs(want).max() > 1.0  # the trajectory is not trivially zero
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    if max_window == 3:
        assert lazy._window_steps.size <= 3


def test_lazy_reads_midway_and_continues():
    """Reading rows (a checkpoint) in the middle must not change what comes after."""
    n_train, n_params = 20, 5
    batches, grads, settings = random_trajectory(n_train, 6, 3, n_params, 1)
    tracked = np.arange(n_train)
    state = InMemoryTrackedState(n_train, n_params, has_momentum=True, dtype=torch.float64)
    lazy = ApproximateHypergradient(state, TrackedSelection(n_train, tracked))
    for k, (batch, g, s) in enumerate(zip(batches, grads, settings, strict=True)):
        lazy.step(batch, torch.from_numpy(g), s)
        if k == 5:
            midway = lazy.hypergradient_rows(0, 10).clone().numpy()
            want_mid = naive_dense_recurrence(
                n_train, tracked, batches[:6], grads[:6], settings[:6], 0.9
            )
            np.testing.assert_allclose(midway, want_mid[:10], rtol=1e-10)
    want = naive_dense_recurrence(n_train, tracked, batches, grads, settings, 0.9)
    np.testing.assert_allclose(lazy.hypergradient_rows(0, n_train).numpy(), want, rtol=1e-10)


def test_duplicate_indices_in_a_batch_inject_twice():
    n_train, n_params = 6, 3
    batches = [np.array([0, 0, 2]), np.array([1, 2, 2])]
    rng = np.random.default_rng(2)
    grads = [rng.standard_normal((3, n_params)) for _ in batches]
    settings = [SGDSettings(0.1, 0.5, 0.01)] * 2
    tracked = np.arange(n_train)
    state = InMemoryTrackedState(n_train, n_params, has_momentum=True, dtype=torch.float64)
    lazy = ApproximateHypergradient(state, TrackedSelection(n_train, tracked))
    for b, g, s in zip(batches, grads, settings, strict=True):
        lazy.step(b, torch.from_numpy(g), s)
    want = naive_dense_recurrence(n_train, tracked, batches, grads, settings, 0.5)
    np.testing.assert_allclose(lazy.hypergradient_rows(0, n_train).numpy(), want, rtol=1e-12)


def test_momentum_appearing_later_is_refused():
    state = InMemoryTrackedState(2, 3, has_momentum=False, dtype=torch.float64)
    lazy = ApproximateHypergradient(state, TrackedSelection(4, np.array([0, 1])))
    with pytest.raises(UnsupportedOptimizerError, match="momentum"):
        lazy.step(
            np.array([0, 1]), torch.zeros(2, 3, dtype=torch.float64), SGDSettings(0.1, 0.9, 0)
        )


def test_tracked_selection_validation():
    with pytest.raises(InvalidArgumentError, match=r"\[0, 5\)"):
        TrackedSelection(5, np.array([0, 5]))
    with pytest.raises(InvalidArgumentError, match="more than once"):
        TrackedSelection(5, np.array([1, 1]))


def test_read_sgd_settings_refuses_what_hydra_does_not_model():
    w = [torch.nn.Parameter(torch.zeros(2))]
    assert read_sgd_settings(torch.optim.SGD(w, lr=0.1, momentum=0.9, weight_decay=1e-4)) == (
        SGDSettings(0.1, 0.9, 1e-4)
    )
    with pytest.raises(UnsupportedOptimizerError, match="Adam"):
        read_sgd_settings(torch.optim.Adam(w))
    with pytest.raises(UnsupportedOptimizerError, match="Nesterov"):
        read_sgd_settings(torch.optim.SGD(w, lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(UnsupportedOptimizerError, match="dampening"):
        read_sgd_settings(torch.optim.SGD(w, lr=0.1, momentum=0.9, dampening=0.1))
    groups = [{"params": w, "lr": 0.1}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2}]
    with pytest.raises(UnsupportedOptimizerError, match="param groups"):
        read_sgd_settings(torch.optim.SGD(groups, lr=0.1))


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_rowwise_and_block_state_updates_agree(momentum):
    n, p = 12, 40
    rng = torch.Generator().manual_seed(0)
    rows = torch.tensor([7, 2, 9])
    transition = torch.randn(3, 2, 2, dtype=torch.float64, generator=rng)
    injection = torch.randn(3, 2, dtype=torch.float64, generator=rng)
    grads = torch.randn(3, p, dtype=torch.float64, generator=rng)
    states = []
    for method in ("_update_block", "_update_rowwise", "_update_fused"):
        state = InMemoryTrackedState(n, p, has_momentum=momentum != 0, dtype=torch.float64)
        state.h.copy_(torch.arange(n * p, dtype=torch.float64).reshape(n, p) / 100)
        if state.m is not None:
            state.m.copy_(torch.ones(n, p, dtype=torch.float64))
        getattr(state, method)(rows, transition, injection, grads)
        getattr(state, method)(rows[:2], transition[:2])
        states.append(state)
    for other in states[1:]:
        torch.testing.assert_close(states[0].h, other.h, rtol=1e-14, atol=1e-15)
        if momentum:
            torch.testing.assert_close(states[0].m, other.m, rtol=1e-14, atol=1e-15)
    assert not torch.equal(states[0].h[7], torch.arange(7 * p, 8 * p, dtype=torch.float64) / 100)
