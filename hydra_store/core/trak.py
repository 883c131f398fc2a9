"""A TRAK-style estimator (Park et al., 2023) from projected per-sample loss gradients at one
point: pure torch, no I/O.

With ``phi_i = R^T g_i`` the projected loss gradient of training sample i (R: a `Projector`,
K columns), ``Phi`` the (N, K) matrix of them and ``phi_u = R^T u`` the projected test
direction:

    C(i) = (1/N) phi_i . (Phi^T Phi / N + damping I)^{-1} phi_u

This is the influence function ``(1/N) u . H^{-1} g_i`` (core/influence.py) with the Hessian
replaced by the projected empirical Fisher ``(1/N) sum_k phi_k phi_k^T`` (the Gauss-Newton
matrix of the training loss, in expectation), so the scale and the sign convention are those of
HyDRA's C(i): positive means removing i would raise the test loss. Normalising the Gram matrix
by N keeps `damping` on the scale of the influence functions' damping.

What it is not: TRAK proper averages the score over an ensemble of independently trained
models, uses the gradient of the margin ``log(p / (1 - p))`` with the reweighting ``Q = diag(1 -
p_i)``, a dense Rademacher projection, and soft-thresholds the scores; this is one model (the
recorded run's final weights), loss gradients, the repository's CountSketch projector, no
thresholding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hydra_store.core.gradients import PerSampleGradients
from hydra_store.core.losses import LossFunction, cross_entropy
from hydra_store.core.parameters import ParameterLayout
from hydra_store.core.projection import IdentityProjector, Projector, TensorSketchProjector
from hydra_store.core.sketched_gradients import SketchedGradients, tensor_sketch_projector
from hydra_store.errors import AnalysisError, InvalidArgumentError

Progress = Callable[[str, int, int], None]


def trak_projector(model: torch.nn.Module, width: int | None, seed: int = 0) -> Projector:
    """The projector of `analyze --method trak`: the tensor sketch `record --project-dim`
    builds (a CountSketch hashed per Linear/Conv2d layer, so that projected per-sample gradients
    come from one forward and backward pass), or no projection when `width` is None or not
    below the parameter count."""
    layout = ParameterLayout.from_model(model)
    if width is None or width >= layout.n_params:
        return IdentityProjector(layout.n_params)
    return tensor_sketch_projector(model, width, seed)


def projected_gradients(
    model: torch.nn.Module,
    layout: ParameterLayout,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    projector: Projector,
    *,
    loss: LossFunction = cross_entropy,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> torch.Tensor:
    """``R^T g_i`` for every given sample, (n, K) float64 on the model's device, at the model's
    weights: from the tensor-sketch hooks when the projector is a tensor sketch, else from the
    full per-sample gradients projected. Each batch is moved to the model's device as used."""
    if projector.n_params != layout.n_params:
        raise InvalidArgumentError(
            f"the projector maps {projector.n_params} parameters; the model has {layout.n_params}"
        )
    param = next(model.parameters())
    sketched = (
        SketchedGradients(model, layout, projector, loss=loss)
        if isinstance(projector, TensorSketchProjector)
        else None
    )
    full = PerSampleGradients(model, layout, loss) if sketched is None else None
    n = int(targets.shape[0])
    out = torch.empty(n, projector.width, dtype=torch.float64, device=param.device)
    batches = range(0, n, batch_size)
    for count, start in enumerate(batches, start=1):
        x = inputs[start : start + batch_size].to(param.device, param.dtype)
        y = targets[start : start + batch_size].to(param.device)
        if sketched is not None:
            block = sketched(x, y).projected
        else:
            block = projector.project(full(x, y)[1])
        out[start : start + x.shape[0]] = block.detach().to(torch.float64)
        if progress is not None:
            progress("projected gradients", count, len(batches))
    return out


def trak_scores(features: torch.Tensor, direction: torch.Tensor, damping: float) -> torch.Tensor:
    """``(1/N) phi_i . (Phi^T Phi / N + damping I)^{-1} phi_u`` for every row phi_i of
    `features` (N, K), float64, by a Cholesky solve of the K x K system: (N,) for one direction
    phi_u (K,), or (N, T) for T directions given as the rows of a (T, K) tensor (per test
    sample: phi_j = R^T g_j), on the device of `features`."""
    if not damping > 0:
        raise InvalidArgumentError(f"the TRAK damping must be positive, got {damping}")
    phi = features.to(torch.float64)
    n, k = phi.shape
    eye = torch.eye(k, dtype=torch.float64, device=phi.device)
    gram = phi.T @ phi / max(1, n) + damping * eye
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        raise AnalysisError("the projected Gram matrix is not positive definite; raise --damping")
    single = direction.ndim == 1
    target = direction.to(phi.device, torch.float64).reshape(-1, k).T
    solved = torch.cholesky_solve(target, factor)
    scores = phi @ solved / max(1, n)
    return scores[:, 0] if single else scores
