"""Influence functions at a point (Koh & Liang, 2017): the Hessian of the mean training loss plus
weight decay, damped, and three ways of applying its inverse to a vector. Pure torch, no I/O.

The training objective at the final weights is ``J(w) = (1/N) sum_k l_k(w) + (lambda/2) |w|^2``.
Weighting sample i's loss by ``1 + N eps_i`` (the recorder's perturbation) adds ``eps_i l_i(w)``;
at a minimum ``grad J(w*) + eps_i g_i(w*) = 0``, so ``dw*/d eps_i = -H^{-1} g_i`` with ``H = hess
J``. The analysis (analysis/influence.py) takes ``C(i) = -(1/N) u . dw*/d eps_i = (1/N) u . H^{-1}
g_i`` with ``H`` damped by ``delta I``; H is symmetric, so one solve ``v = H^{-1} u`` serves every
training sample, and ``C(i) = (1/N) g_i . v``. Per test sample j the same with g_j for u: one
solve per test sample, which every solver below takes for a block of right-hand sides at once.

Solvers (all three solve the same damped system ``A x = b``, ``A = H + delta I``):

- `explicit_solve`: the dense Hessian (P Hessian-vector products in blocks) and its eigen-
  decomposition: exact, and it sees every negative eigenvalue. O(P^2) memory, O(P^3) time.
- `conjugate_gradient`: Hessian-vector products only; records the smallest curvature ``p.Ap /
  p.p`` along its search directions (negative: A is indefinite).
- `lissa`: the stochastic Neumann series of Agarwal et al. as Koh & Liang use it, ``h_j = b +
  h_{j-1} - A_batch h_{j-1} / scale``, ``x = h_depth / scale``, averaged over repeats. Its damping
  is the same ``delta`` as the others' (Koh & Liang's code writes ``(1 - d) h`` instead, which is
  a damping of ``d * scale``).

`lanczos_extremes` estimates the extreme eigenvalues from Hessian-vector products (the automatic
damping and LiSSA's scale when the dense Hessian is not formed).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hydra_store.core.gradients import (
    batch_loss_function,
    hessian_vector_products,
    per_sample_loss_function,
)
from hydra_store.core.losses import LossFunction, cross_entropy
from hydra_store.core.parameters import ParameterLayout
from hydra_store.errors import AnalysisError, InvalidArgumentError

Progress = Callable[[str, int, int], None]

# Above this many parameters the dense Hessian (P^2 float64 values, twice for the eigen-
# decomposition) is refused: 5,000 parameters take 200 MB and ~10 s of eigh on 2 cores.
EXPLICIT_MAX_PARAMS = 5000
# Columns of the dense Hessian computed per vmapped Hessian-vector product.
HESSIAN_BLOCK = 128


class TrainingHessian:
    """The Hessian of ``(1/N) sum_k l_k(w) + (weight_decay/2) |w|^2`` over the given samples at
    `point`, applied to vectors in batches of `batch_size` samples (float64 throughout is the
    caller's choice: the model, point and vectors must share a dtype and a device; the samples
    are moved to the point's device once, here)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layout: ParameterLayout,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        point: torch.Tensor,
        *,
        weight_decay: float = 0.0,
        loss: LossFunction = cross_entropy,
        batch_size: int = 1024,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.layout, self.loss = model, layout, loss
        self.point = point.detach()
        dtype, device = self.point.dtype, self.point.device
        self.inputs = inputs.to(device, dtype)
        self.targets = targets.to(device, dtype) if targets.is_floating_point() else targets
        self.targets = self.targets.to(device)
        self.weight_decay = float(weight_decay)
        self.batch_size = int(batch_size)
        self.n = int(self.targets.shape[0])
        self.n_params = layout.n_params

    def _loss_hvp(self, index: torch.Tensor | None, vectors: torch.Tensor) -> torch.Tensor:
        """Hessian of the mean loss of the samples `index` (None: all) times each row.

        One row (the iterative solvers) by double backward: the gradient of the batch's loss
        sum / n with its graph, then one backward pass; measured on the digits MLP in float64,
        3.9 ms on 128 samples against 175 ms for torch.func's forward-over-reverse. Blocks of
        rows (the dense Hessian) by torch.func's vmapped forward-over-reverse
        (`hessian_vector_products`), which measured as fast as or faster than batched double
        backward there."""
        if index is not None:
            index = index.to(self.inputs.device)
        x = self.inputs if index is None else self.inputs[index]
        y = self.targets if index is None else self.targets[index]
        n = int(y.shape[0])
        out = torch.zeros_like(vectors)
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            xb, yb = x[start:stop], y[start:stop]
            if vectors.shape[0] > 1:
                f = batch_loss_function(self.model, self.layout, xb, yb, self.loss)
                out += hessian_vector_products(f, self.point, vectors) * ((stop - start) / n)
                continue
            losses = per_sample_loss_function(self.model, self.layout, xb, yb, self.loss)
            with torch.enable_grad():
                w = self.point.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(losses(w).sum() / n, w, create_graph=True)
                if g.requires_grad:  # else the loss is linear in w: no curvature
                    (row,) = torch.autograd.grad(g, w, vectors[0], allow_unused=True)
                    if row is not None:
                        out[0] += row
        return out

    def apply(self, vectors: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """(H + weight_decay I) v for each row v of `vectors` (K, P), H over all samples or
        over the samples `index` (a minibatch estimate of it)."""
        return self._loss_hvp(index, vectors) + self.weight_decay * vectors

    def matrix(self, progress: Progress | None = None) -> torch.Tensor:
        """The dense (P, P) Hessian including weight decay, symmetrised (rounding makes the
        computed columns differ from the rows by ~1e-16 relative)."""
        p = self.n_params
        if p > EXPLICIT_MAX_PARAMS:
            raise InvalidArgumentError(
                f"the explicit Hessian of {p} parameters is too large (at most "
                f"{EXPLICIT_MAX_PARAMS}); use --solver cg or lissa"
            )
        dtype, device = self.point.dtype, self.point.device
        hessian = torch.empty(p, p, dtype=dtype, device=device)
        blocks = range(0, p, HESSIAN_BLOCK)
        for n, start in enumerate(blocks, start=1):
            stop = min(p, start + HESSIAN_BLOCK)
            basis = torch.zeros(stop - start, p, dtype=dtype, device=device)
            rows = torch.arange(stop - start, device=device)
            basis[rows, torch.arange(start, stop, device=device)] = 1.0
            hessian[start:stop] = self.apply(basis)
            if progress is not None:
                progress("Hessian", n, len(blocks))
        return (hessian + hessian.T) / 2


@dataclass(frozen=True)
class InverseResult:
    """``A^{-1} b`` and what the solver saw of A = H + damping I.

    `min_curvature`: the smallest eigenvalue of A (explicit), or the smallest Rayleigh quotient
    ``x.Ax / x.x`` over the vectors the solver applied A to on all samples (cg: its search
    directions; lissa: the solution) -- an upper bound of the smallest eigenvalue, so a negative
    value proves A indefinite. `negative_share`: the share of A's eigenvalues below zero
    (explicit only). `residual`: ``|A x - b| / |b|`` (cg, lissa)."""

    solution: torch.Tensor
    min_curvature: float
    negative_share: float | None = None
    undamped_negative_share: float | None = None
    iterations: int = 0
    residual: float | None = None
    converged: bool = True
    scale: float | None = None

    @property
    def indefinite(self) -> bool:
        return self.min_curvature < 0


def explicit_solve(
    eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, damping: float, b: torch.Tensor
) -> InverseResult:
    """``(H + damping I)^{-1} b`` for each row of b (K, P) or for b (P,), from the eigen-
    decomposition of the symmetric H (weight decay included; `torch.linalg.eigh` of
    `TrainingHessian.matrix()`). An exactly singular damped Hessian raises AnalysisError; an
    indefinite one is inverted as it is (the caller warns)."""
    damped = eigenvalues + damping
    if bool((damped == 0).any()):
        raise AnalysisError(
            "the damped Hessian is singular (an eigenvalue of exactly -damping); change --damping"
        )
    single = b.ndim == 1
    rhs = b[None] if single else b
    solution = ((rhs @ eigenvectors) / damped) @ eigenvectors.T
    return InverseResult(
        solution=solution[0] if single else solution,
        min_curvature=float(damped.min()),
        negative_share=float((damped < 0).double().mean()),
        undamped_negative_share=float((eigenvalues < 0).double().mean()),
    )


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    tolerance: float = 1e-6,
    max_iterations: int = 1000,
    progress: Progress | None = None,
) -> InverseResult:
    """Solve ``A x = b`` by conjugate gradients, `apply` giving A v for the rows v of a (K, P)
    tensor. b is (P,), or (K, P) for K independent systems solved side by side (one block
    product per iteration for the rows not yet converged; each row takes the steps it would take
    alone, up to rounding). A row stops when ``|r| <= tolerance |b|``, all after `max_iterations`.
    On an indefinite A it carries on (the iteration is still defined unless p.Ap = 0) and reports
    the negative curvature it met. For K rows, `residual` is the largest relative residual,
    `iterations` the most any row took and `converged` whether all did."""
    single = b.ndim == 1
    rhs = b[None] if single else b
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    b_norm = rs.sqrt()
    active = b_norm > 0
    min_curvature = math.inf
    iterations = 0
    for step in range(1, max_iterations + 1):
        rows = active.nonzero()[:, 0]
        if rows.numel() == 0:
            break
        iterations = step
        p_rows = p[rows]
        ap = apply(p_rows)
        pap = (p_rows * ap).sum(1)
        min_curvature = min(min_curvature, float((pap / (p_rows * p_rows).sum(1)).min()))
        stalled = pap == 0
        alpha = torch.where(stalled, torch.zeros_like(pap), rs[rows] / torch.where(stalled, 1, pap))
        x[rows] += alpha[:, None] * p_rows
        r_rows = r[rows] - alpha[:, None] * ap
        r[rows] = r_rows
        rs_new = (r_rows * r_rows).sum(1)
        done = stalled | (rs_new.sqrt() <= tolerance * b_norm[rows])
        p[rows] = r_rows + (rs_new / rs[rows])[:, None] * p_rows
        rs[rows] = rs_new
        active[rows[done]] = False
        if progress is not None:
            progress("conjugate gradients", step, max_iterations)
    if bool((b_norm == 0).all()):
        residuals = torch.zeros_like(b_norm)
    else:
        residuals = torch.linalg.vector_norm(rhs - apply(x), dim=1) / torch.where(
            b_norm > 0, b_norm, 1
        )
    residual = float(residuals.max())
    return InverseResult(
        x[0] if single else x,
        min_curvature,
        iterations=iterations,
        residual=residual,
        converged=residual <= 10 * tolerance,
    )


def lissa(
    apply_batch: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    n_samples: int,
    b: torch.Tensor,
    *,
    scale: float,
    damping: float,
    depth: int,
    repeats: int,
    batch_size: int,
    seed: int = 0,
    progress: Progress | None = None,
) -> InverseResult:
    """``(H + damping I)^{-1} b`` by LiSSA: `repeats` independent recursions of `depth` steps,
    ``h_j = b + h_{j-1} - (H_batch + damping I) h_{j-1} / scale`` with H_batch the Hessian on
    `batch_size` samples drawn afresh at each step (`apply_batch(vectors, index)`, index None
    for all samples), averaged as
    ``h_depth / scale``. b is (P,), or (K, P): K right-hand sides carried through the same
    minibatches (one block product per step), so that the estimate is linear in b -- the
    solution for the mean of the rows is the mean of their solutions. It converges when every
    eigenvalue of the damped minibatch Hessians lies in (0, 2 scale); a recursion that grows
    faster than its convergent bound ``|h_j| <= (j + 1) |b|`` is stopped with AnalysisError
    (the scale is too small). The minibatches are drawn on the CPU whatever b's device, so a
    seed draws the same samples everywhere."""
    generator = torch.Generator().manual_seed(seed)
    single = b.ndim == 1
    rhs = b[None] if single else b
    b_norm = torch.linalg.vector_norm(rhs, dim=1)
    estimates = []
    done, total = 0, depth * repeats
    for _ in range(repeats):
        h = rhs.clone()
        for j in range(1, depth + 1):
            if batch_size >= n_samples:
                index = None
            else:
                index = torch.randperm(n_samples, generator=generator)[:batch_size]
            h = rhs + h - (apply_batch(h, index) + damping * h) / scale
            if j % 50 == 0 or j == depth:
                norm = torch.linalg.vector_norm(h, dim=1)
                if not bool(torch.isfinite(norm).all()) or bool(
                    (norm > 4 * (j + 1) * b_norm).any()
                ):
                    raise AnalysisError(
                        f"LiSSA diverged after {j} steps (scale {scale:.4g} is below the "
                        "largest eigenvalue of the damped minibatch Hessians, or the Hessian "
                        "is indefinite); raise --lissa-scale or --damping"
                    )
            done += 1
            if progress is not None and (done % 100 == 0 or done == total):
                progress("LiSSA", done, total)
        estimates.append(h / scale)
    solution = torch.stack(estimates).mean(0)
    return InverseResult(
        solution[0] if single else solution, math.nan, iterations=total, scale=scale
    )


def lanczos_extremes(
    apply: Callable[[torch.Tensor], torch.Tensor],
    n_params: int,
    *,
    steps: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(smallest, largest) eigenvalue estimates of a symmetric A: the extreme Ritz values after
    `steps` Lanczos steps (full reorthogonalisation) from a seeded random start. The extremes
    converge first; the smallest Ritz value is an upper bound of the smallest eigenvalue and the
    largest a lower bound of the largest. The start is drawn on the CPU in float64 (the same on
    every device) and moved to `device`."""
    steps = max(1, min(int(steps), int(n_params)))
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(n_params, generator=generator, dtype=torch.float64).to(device, dtype)
    v = v / torch.linalg.vector_norm(v)
    basis = torch.zeros(steps, n_params, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        basis[j] = v
        w = apply(v[None])[0]
        alpha = float(w @ v)
        alphas.append(alpha)
        kept = basis[: j + 1]
        w = w - kept.T @ (kept @ w)
        w = w - kept.T @ (kept @ w)  # twice is enough (Kahan-Parlett)
        beta = float(torch.linalg.vector_norm(w))
        if j == steps - 1 or beta <= 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        v = w / beta
    k = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return float(ritz[0]), float(ritz[-1])
