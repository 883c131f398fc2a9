"""Fused CPU kernels for the tracked-state update, compiled with numba.

The update of a batch's rows, `(h, m) <- A_r (h, m) + (alpha_r, beta_r) g_r`, is memory-bound:
torch runs it as 7 separate passes per row (each reads and writes whole rows), numba as one
pass that reads h, m, g once and writes h, m once, rows spread over the cores. Measured at
P = 61,706 and 64 rows (benchmarks/bench_record.py): see docs/recording.md.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def mix_rows(h, m, rows, transition, injection, gradients, inject):  # pragma: no cover - jitted
    """With momentum: h, m (N, P); rows (R,); transition (R, 2, 2); injection (R, 2); g (R, P)."""
    n_params = h.shape[1]
    for k in numba.prange(rows.shape[0]):
        r = rows[k]
        a, b = transition[k, 0, 0], transition[k, 0, 1]
        c, d = transition[k, 1, 0], transition[k, 1, 1]
        alpha, beta = injection[k, 0], injection[k, 1]
        for j in range(n_params):
            hv, mv = h[r, j], m[r, j]
            if inject:
                gv = gradients[k, j]
                h[r, j] = a * hv + b * mv + alpha * gv
                m[r, j] = c * hv + d * mv + beta * gv
            else:
                h[r, j] = a * hv + b * mv
                m[r, j] = c * hv + d * mv


@numba.njit(parallel=True, cache=True)
def scale_rows(h, rows, transition, injection, gradients, inject):  # pragma: no cover - jitted
    """Without momentum: h <- a h + alpha g."""
    n_params = h.shape[1]
    for k in numba.prange(rows.shape[0]):
        r = rows[k]
        a, alpha = transition[k, 0, 0], injection[k, 0]
        for j in range(n_params):
            if inject:
                h[r, j] = a * h[r, j] + alpha * gradients[k, j]
            else:
                h[r, j] = a * h[r, j]


def update_rows_cpu(
    h: np.ndarray,
    m: np.ndarray | None,
    rows: np.ndarray,
    transition: np.ndarray,
    injection: np.ndarray | None,
    gradients: np.ndarray | None,
) -> None:
    """Apply the affine row update in place on CPU arrays (float32 or float64)."""
    inject = gradients is not None
    if not inject:
        injection = np.zeros((rows.size, 2))
        gradients = np.zeros((1, 1), dtype=h.dtype)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    transition = np.ascontiguousarray(transition, dtype=np.float64)
    injection = np.ascontiguousarray(injection, dtype=np.float64)
    gradients = np.ascontiguousarray(gradients, dtype=h.dtype)
    if m is None:
        scale_rows(h, rows, transition, injection, gradients, inject)
    else:
        mix_rows(h, m, rows, transition, injection, gradients, inject)
