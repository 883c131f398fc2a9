"""Fingerprints of a training trajectory: scalar checks that a computation made after training
(a partition of the tracked samples, docs/scaling.md) sees the steps training took.

Training stores, for every step and batch slot, `f = <g_i(w_{t-1}), u>`: the per-sample
gradient's component along one fixed random unit vector u. Two checks follow, both cheap:

- A partition recomputes the per-sample gradients of its own samples at the stored weights; each
  must reproduce its stored fingerprint (`check_gradient_fingerprints`). A wrong batch index,
  weight or input gives another gradient.
- The SGD update, read along u, ties the stored weights, learning rates, momenta, weight decays
  and the mean fingerprint of each step together (`check_sgd_steps`): with d_t = <w_t, u> and
  c_t = <v_t, u>, `c_t = (d_{t-1} - d_t) / eta_t` must equal `p_t c_{t-1} + mean_i f_{t,i} +
  lambda_t d_{t-1}`. A wrong learning rate (or momentum, or weights) breaks it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from hydra_store.errors import ReplayMismatchError

# Tolerance of a recomputed fingerprint against the stored one, in units of the larger of the
# gradient's own norm and the root-mean-square norm of its step's per-sample gradients
# (|f| <= |g| since |u| = 1). The second matters: the float32 gradient of a sample the model
# already fits (softmax output within 1e-6 of its label) is a difference of nearly equal
# numbers, so its own relative error can reach tens of percent between two thread counts,
# while its error against the step's typical gradient stays ~1e-7.
FINGERPRINT_RTOL = 1e-4


def fingerprint_direction(n_params: int, seed: int) -> torch.Tensor:
    """The unit vector u (float64) of a recording's fingerprints, drawn from `seed`."""
    generator = torch.Generator().manual_seed(int(seed))
    direction = torch.randn(n_params, generator=generator, dtype=torch.float64)
    return direction / direction.norm()


def gradient_fingerprints(gradients: torch.Tensor, direction: torch.Tensor) -> np.ndarray:
    """<g_i, u> of each row of `gradients` (B, P), as float64."""
    return (gradients @ direction.to(gradients.device, gradients.dtype)).double().cpu().numpy()


def gradient_scale(gradients: torch.Tensor) -> float:
    """The root-mean-square norm of a step's per-sample gradients (B, P)."""
    return float(gradients.norm()) / max(1, gradients.shape[0]) ** 0.5


def estimated_gradient_scale(
    fingerprints: np.ndarray,
    mean_gradient: torch.Tensor,
    tracked_rows: torch.Tensor | None = None,
) -> float:
    """`gradient_scale` of a step whose per-sample gradients were not all formed (a BatchNorm
    or dropout model forms only its tracked slots' rows), from its B fingerprints f_i, its mean
    gradient and the rows it did form. The largest of three figures:

    - sqrt(P mean_i f_i^2): for u uniform on the unit sphere of R^P, E[<g, u>^2] = |g|^2 / P,
      so it estimates the root-mean-square norm; it scatters as a chi-square variate of few
      degrees of freedom where few gradients dominate the batch;
    - |mean_i g_i| and sqrt(sum over the formed rows |g_i|^2 / B): both never exceed the
      root-mean-square norm, and the first is close to it where the gradients point alike, the
      second where the dominant gradients are tracked ones.

    A floor of the fingerprint check's tolerance: lower than the exact one only where the
    gradients of untracked samples dominate and point apart (docs/scaling.md)."""
    n_params, batch = int(mean_gradient.numel()), max(1, int(fingerprints.size))
    spread = (
        float(np.sqrt(n_params * np.mean(np.square(fingerprints)))) if fingerprints.size else 0.0
    )
    mean_norm = float(torch.linalg.vector_norm(mean_gradient.double()))
    formed = 0.0
    if tracked_rows is not None and tracked_rows.numel():
        formed = float(torch.linalg.vector_norm(tracked_rows.double())) / batch**0.5
    return max(mean_norm, formed, spread)


def check_gradient_fingerprints(
    gradients: torch.Tensor,
    direction: torch.Tensor,
    stored: np.ndarray,
    *,
    step: int,
    samples: np.ndarray,
    scale: float,
) -> None:
    """Raise ReplayMismatchError unless each recomputed gradient's fingerprint is the stored
    one; `scale`: the step's stored `gradient_scale`."""
    computed = gradient_fingerprints(gradients, direction)
    norms = np.maximum(torch.linalg.vector_norm(gradients, dim=1).double().cpu().numpy(), scale)
    error = np.abs(computed - stored)
    bad = np.nonzero(~(error <= FINGERPRINT_RTOL * norms + 1e-30))[0]
    if bad.size:
        k = int(bad[0])
        raise ReplayMismatchError(
            f"the gradient of training sample {int(samples[k])} at step {step} differs from the "
            f"one training took (fingerprint {computed[k]:.6g}, recorded {stored[k]:.6g}); the "
            "store's batches, weights or data do not match this run"
        )


def check_sgd_steps(
    weight_dots: np.ndarray,
    weight_abs_dots: np.ndarray,
    first_velocity_dot: float,
    lr: np.ndarray,
    momentum: np.ndarray,
    weight_decay: np.ndarray,
    mean_fingerprint: np.ndarray,
    *,
    epsilon: float,
    first_step: int = 1,
) -> float:
    """Check the SGD update along u for steps first_step..first_step + T - 1.

    `weight_dots` (T + 1,): <w_t, u> from the weights before the first step to after the last;
    `weight_abs_dots`: <|w_t|, |u|> (bounds the rounding of the stored weights); `epsilon`: the
    weights' unit roundoff. Returns the largest error in units of its tolerance (below 1 passes)
    and raises ReplayMismatchError at the first step that fails.
    """
    velocity = (weight_dots[:-1] - weight_dots[1:]) / lr
    previous = np.concatenate([[first_velocity_dot], velocity[:-1]])
    predicted = momentum * previous + mean_fingerprint + weight_decay * weight_dots[:-1]
    rounding = 4 * epsilon * (weight_abs_dots[:-1] + weight_abs_dots[1:]) / lr
    rounding_before = np.concatenate([[0.0], rounding[:-1]])
    tolerance = (
        rounding
        + momentum * rounding_before
        + 1e-3 * (np.abs(velocity) + np.abs(momentum * previous) + np.abs(mean_fingerprint))
        + 1e-300
    )
    ratio = np.abs(velocity - predicted) / tolerance
    bad = np.nonzero(~(ratio <= 1))[0]
    if bad.size:
        k = int(bad[0])
        raise ReplayMismatchError(
            f"step {first_step + k} of the stored trajectory is not the SGD update its stored "
            f"learning rate ({lr[k]:g}), momentum ({momentum[k]:g}) and weight decay "
            f"({weight_decay[k]:g}) give from the stored weights and gradients; the store's "
            "trajectory was changed or damaged"
        )
    return float(ratio.max()) if ratio.size else 0.0


def sample_digests(inputs: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    """A 64-bit BLAKE2b digest of each sample's input bytes (as given, in their dtype) and
    target bytes (int64 labels, or float64 regression targets), (B,) uint64, never 0: a store
    keeps one per training sample (`train_digest`, 0 where the sample was never drawn), so that
    data given to an analyser later can be checked sample by sample against what was trained
    on."""
    n = int(inputs.shape[0])
    x = inputs.detach().cpu().contiguous().reshape(n, -1).numpy()
    y = targets.detach().cpu().reshape(n, -1)
    y = (y.to(torch.float64) if y.is_floating_point() else y.to(torch.int64)).numpy()
    out = np.empty(n, dtype=np.uint64)
    for k in range(n):
        digest = hashlib.blake2b(x[k].tobytes(), digest_size=8)
        digest.update(y[k].tobytes())
        out[k] = int.from_bytes(digest.digest(), "little") or 1
    return out
