"""The trajectory fingerprints: the SGD-update check against torch.optim.SGD itself, and the
per-sample gradient check's tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hydra_store.core.fingerprints import (
    check_gradient_fingerprints,
    check_sgd_steps,
    estimated_gradient_scale,
    fingerprint_direction,
    gradient_fingerprints,
    gradient_scale,
)
from hydra_store.errors import ReplayMismatchError


def _sgd_run(dtype: torch.dtype, steps: int = 30, n_params: int = 500, batch: int = 8):
    """Weights of torch.optim.SGD driven by known per-sample gradients; returns what a store
    holds: weights before/after each step, settings, and each step's per-sample gradients."""
    generator = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n_params, dtype=dtype, generator=generator))
    optimizer = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.01)
    weights, grads, lrs = [w.detach().clone()], [], []
    for t in range(steps):
        per_sample = torch.randn(batch, n_params, dtype=dtype, generator=generator) * 0.3
        optimizer.param_groups[0]["lr"] = 0.1 * 0.95**t
        lrs.append(optimizer.param_groups[0]["lr"])
        w.grad = per_sample.mean(0)
        optimizer.step()
        weights.append(w.detach().clone())
        grads.append(per_sample)
    return weights, grads, np.array(lrs)


def _check(weights, grads, lrs, u, *, epsilon, lr_factor=1.0, momentum=0.9):
    w = torch.stack(weights).double().numpy()
    means = np.array([gradient_fingerprints(g, u).mean() for g in grads])
    lr = lrs.copy()
    lr[10] *= lr_factor
    return check_sgd_steps(
        w @ u.numpy(),
        np.abs(w) @ np.abs(u.numpy()),
        0.0,
        lr,
        np.full(lr.size, momentum),
        np.full(lr.size, 0.01),
        means,
        epsilon=epsilon,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_sgd_check_passes_torch_sgd_and_refuses_a_changed_step(dtype):
    weights, grads, lrs = _sgd_run(dtype)
    u = fingerprint_direction(500, seed=1)
    epsilon = float(torch.finfo(dtype).eps) / 2
    assert _check(weights, grads, lrs, u, epsilon=epsilon) < 0.5
    with pytest.raises(ReplayMismatchError, match="step 11 of the stored trajectory"):
        _check(weights, grads, lrs, u, epsilon=epsilon, lr_factor=1.01)
    with pytest.raises(ReplayMismatchError, match="momentum"):
        _check(weights, grads, lrs, u, epsilon=epsilon, momentum=0.8)


def test_the_direction_is_a_seeded_unit_vector():
    u = fingerprint_direction(1000, seed=3)
    assert abs(float(u.norm()) - 1) < 1e-12
    torch.testing.assert_close(u, fingerprint_direction(1000, seed=3), rtol=0, atol=0)
    assert not torch.allclose(u, fingerprint_direction(1000, seed=4))


def test_a_tiny_gradient_is_judged_against_its_steps_scale():
    u = fingerprint_direction(100, seed=0)
    generator = torch.Generator().manual_seed(0)
    typical = torch.randn(4, 100, dtype=torch.float64, generator=generator)
    tiny = 1e-6 * torch.randn(1, 100, dtype=torch.float64, generator=generator)
    gradients = torch.cat([typical, tiny])
    scale = gradient_scale(gradients)
    stored = gradient_fingerprints(gradients, u)
    # The tiny gradient off by 50% of itself: far below 1e-4 of the step's scale.
    recomputed = gradients.clone()
    recomputed[4] *= 1.5
    samples = np.arange(5)
    check_gradient_fingerprints(recomputed, u, stored, step=1, samples=samples, scale=scale)
    # A typical gradient off by 1%: refused, naming the sample.
    recomputed = gradients.clone()
    recomputed[2] *= 1.01
    with pytest.raises(ReplayMismatchError, match="training sample 2 at step 7"):
        check_gradient_fingerprints(recomputed, u, stored, step=7, samples=samples, scale=scale)


@pytest.mark.parametrize("aligned", [False, True], ids=["independent", "aligned"])
def test_the_estimated_scale_stays_within_a_small_factor_of_the_exact_one(aligned):
    """`estimated_gradient_scale` from the fingerprints and the mean gradient alone, against
    the exact root-mean-square norm of the per-sample gradients, over 300 random directions u:
    gradients in independent directions (where sqrt(P mean f^2) concentrates) and gradients
    nearly along one direction (where it scatters, and the mean gradient's norm holds it up)."""
    generator = torch.Generator().manual_seed(12345)  # not a direction's seed below
    n_params, batch = 2000, 64
    if aligned:
        common = torch.randn(n_params, generator=generator, dtype=torch.float64)
        sizes = torch.rand(batch, 1, generator=generator, dtype=torch.float64) + 0.5
        noise = torch.randn(batch, n_params, generator=generator, dtype=torch.float64)
        gradients = sizes * common + 0.05 * noise
    else:
        gradients = torch.randn(batch, n_params, generator=generator, dtype=torch.float64)
        gradients *= torch.rand(batch, 1, generator=generator, dtype=torch.float64) * 3
    exact = gradient_scale(gradients)
    mean = gradients.mean(0)
    ratios = []
    for seed in range(300):
        direction = fingerprint_direction(n_params, 1000 + seed)
        estimate = estimated_gradient_scale(gradient_fingerprints(gradients, direction), mean)
        assert estimate >= float(mean.norm())
        ratios.append(estimate / exact)
    assert float(mean.norm()) <= exact  # the mean's norm never exceeds the RMS norm
    low, high = (0.7, 4.0) if aligned else (0.5, 2.0)
    assert low < min(ratios) and max(ratios) < high, (min(ratios), max(ratios))


def test_a_dominant_tracked_gradient_holds_the_estimated_scale_up():
    """One gradient 30 times the others' (a misfit sample among fitted ones): from the
    fingerprints alone the estimate scatters as one chi-square variate (it fell to 0.125 of the
    exact scale in a review's trial); with that sample's row formed (it is tracked) the formed
    rows' bound keeps it above 0.9 of the exact scale in every direction (above it, the
    chi-square's tail: 3.35 at most over these 300 directions)."""
    generator = torch.Generator().manual_seed(12345)
    n_params, batch = 2000, 64
    gradients = torch.randn(batch, n_params, generator=generator, dtype=torch.float64)
    gradients[7] *= 30
    exact = gradient_scale(gradients)
    mean = gradients.mean(0)
    alone, with_rows = [], []
    for seed in range(300):
        fingerprints = gradient_fingerprints(
            gradients, fingerprint_direction(n_params, 1000 + seed)
        )
        alone.append(estimated_gradient_scale(fingerprints, mean) / exact)
        with_rows.append(estimated_gradient_scale(fingerprints, mean, gradients[[3, 7]]) / exact)
    assert min(alone) < 0.5  # what the formed rows are for
    assert min(with_rows) > 0.9 and max(with_rows) < 5, (min(with_rows), max(with_rows))
