"""Influence functions at the final weights (Koh & Liang, 2017) as a contribution method beside
HyDRA: `analyze --method influence`, written to `influence/<test set>`.

With the recorder's perturbation (sample i's loss weighted by ``1 + N eps_i``) and the training
objective ``J(w) = (1/N) sum_k l_k(w) + (lambda/2) |w|^2`` at a minimum w*, ``dw*/d eps_i =
-H^{-1} g_i`` (H the Hessian of J), so in HyDRA's convention

    C_IF(i) = -(1/N) u . dw*/d eps_i = (1/N) u . (H + delta I)^{-1} g_i

with u the mean test-loss gradient at the final weights and delta the damping. Leaving i out is
``eps_i = -1/N``, and C_IF(i) is the first-order change of the test loss: positive, i helps. On
a strongly convex problem trained to convergence it equals HyDRA's exact C(i) (the recurrence's
fixed point is ``h = -H^{-1} g_i``; tests/analysis/test_influence.py). The derivation, the
solvers and the measured default damping: docs/analysis.md, "Baselines".

The Hessian, its solves and the gradients are computed in float64 (the model is rebuilt in
float64 at the final weights), whatever the store's dtype.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.analysis.baselines import (
    SIGN_CONVENTION,
    extremes_lines,
    load_recorded_run,
    read_total,
    total_arrays,
)
from hydra_store.analysis.methods import ContributionMethod, Totals
from hydra_store.arguments import InfluenceConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient, per_sample_directional_derivatives
from hydra_store.core.influence import (
    InverseResult,
    TrainingHessian,
    conjugate_gradient,
    explicit_solve,
    lanczos_extremes,
    lissa,
)
from hydra_store.core.parameters import get_flat_parameters
from hydra_store.errors import IndefiniteHessianWarning
from hydra_store.replay.recorded_run import RunInputs
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

INFLUENCE_GROUP = "influence"
# The default damping: this many times the magnitude of the most negative eigenvalue of the
# Hessian with weight decay (0 when there is none), so that the damped Hessian is positive
# definite with its smallest eigenvalue twice as far from zero as the most negative one was.
# Chosen by leave-one-out measurement on two digits runs whose best fixed dampings differ 30-fold
# (docs/analysis.md, "Baselines": factors 2-5 are within 0.03 of the best Spearman on both).
AUTO_DAMPING_FACTOR = 3.0
# Lanczos steps for the extreme eigenvalues when the solver is not explicit (the auto damping,
# LiSSA's scale): on digits 32 steps gave the smallest to 2%, 64 to 5 digits.
LANCZOS_STEPS = 64
# LiSSA's default scale: this many times the largest eigenvalue of the damped Hessian on all
# samples, a margin for minibatch Hessians, whose spectra are wider.
LISSA_SCALE_MARGIN = 1.5
SOLVER_NAMES = {
    "explicit": "explicit inverse",
    "cg": "conjugate gradients",
    "lissa": "LiSSA",
}


@dataclass(frozen=True)
class Spectrum:
    """The extreme eigenvalues of the Hessian with weight decay (exact for the explicit solver,
    Lanczos estimates otherwise; None when not needed), and the damping they gave."""

    smallest: float | None
    largest: float | None
    damping: float
    auto: bool


def choose_damping(smallest: float | None, given: float | None) -> Spectrum:
    """The given damping, or AUTO_DAMPING_FACTOR x max(0, -smallest eigenvalue)."""
    if given is not None:
        return Spectrum(smallest, None, float(given), False)
    return Spectrum(smallest, None, AUTO_DAMPING_FACTOR * max(0.0, -(smallest or 0.0)), True)


def inverse_hessian_product(
    hessian: TrainingHessian,
    u: torch.Tensor,
    config: InfluenceConfig,
    progress: Progress | None = None,
) -> tuple[InverseResult, Spectrum]:
    """``(H + damping I)^{-1} u`` by the configured solver (H with weight decay), and the
    spectrum and damping it used."""
    if config.solver == "explicit":
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian.matrix(progress))
        smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        spectrum = dataclasses.replace(choose_damping(smallest, config.damping), largest=largest)
        return explicit_solve(eigenvalues, eigenvectors, spectrum.damping, u), spectrum
    smallest = largest = None
    if config.damping is None or (config.solver == "lissa" and config.lissa_scale is None):
        smallest, largest = lanczos_extremes(
            hessian.apply,
            hessian.n_params,
            steps=LANCZOS_STEPS,
            seed=config.seed,
            dtype=u.dtype,
            device=u.device,
        )
    spectrum = dataclasses.replace(choose_damping(smallest, config.damping), largest=largest)
    damping = spectrum.damping

    def damped(vectors: torch.Tensor) -> torch.Tensor:
        return hessian.apply(vectors) + damping * vectors

    if config.solver == "cg":
        result = conjugate_gradient(
            damped,
            u,
            tolerance=config.cg_tolerance,
            max_iterations=config.cg_max_iterations,
            progress=progress,
        )
        return result, spectrum
    scale = config.lissa_scale
    if scale is None:
        scale = LISSA_SCALE_MARGIN * (float(largest) + damping)
    result = lissa(
        hessian.apply,
        hessian.n,
        u,
        scale=scale,
        damping=damping,
        depth=config.lissa_depth,
        repeats=config.lissa_repeats,
        batch_size=config.lissa_batch_size,
        seed=config.seed,
        progress=progress,
    )
    # One product on all samples: how far the estimate is from solving the system, and the
    # curvature along it (negative: the damped Hessian is indefinite).
    x = result.solution
    applied = damped(x[None])[0]
    residual = float(torch.linalg.vector_norm(applied - u) / torch.linalg.vector_norm(u))
    curvature = float(x @ applied / (x @ x)) if float(x @ x) > 0 else math.inf
    return dataclasses.replace(result, residual=residual, min_curvature=curvature), spectrum


def indefinite_message(result: InverseResult, damping: float) -> str:
    """One line saying the damped Hessian is indefinite, and by how much to raise the damping."""
    needed = damping - result.min_curvature
    if result.negative_share is not None:
        seen = (
            f"{result.negative_share:.1%} of its eigenvalues are negative, the smallest "
            f"{result.min_curvature:.3g}"
        )
        advice = f"Raise --damping above {needed:.3g}"
    else:
        # The curvature along the solver's directions only bounds the smallest eigenvalue.
        seen = f"curvature {result.min_curvature:.3g} along a direction the solver took"
        advice = f"Raise --damping (above {needed:.3g} at least)"
    return (
        f"the damped Hessian (damping {damping:.3g}) is indefinite at the final weights: {seen}; "
        f"the influence scores are unreliable. {advice}, or leave it out (automatic)"
    )


@dataclass
class InfluenceSummary:
    """What `run_influence` computed and where it wrote it."""

    path: Path
    group: str
    test_set: str
    solver: str
    weight_decay: float
    n_train: int
    n_params: int
    checkpoint: int
    step: int
    test_loss: float
    seconds: float
    spectrum: Spectrum
    inverse: InverseResult = field(repr=False)
    total: np.ndarray = field(repr=False)
    warning: str | None = None

    @property
    def damping(self) -> float:
        return self.spectrum.damping

    def lines(self) -> list[str]:
        inverse, spectrum = self.inverse, self.spectrum
        lines = [
            f"influence functions ({SOLVER_NAMES[self.solver]}) at checkpoint {self.checkpoint} "
            f"(step {self.step}): all {self.n_train} training samples against test set "
            f"{self.test_set!r}, in {self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: total_contribution",
        ]
        hessian = (
            f"Hessian of the mean training loss + weight decay {self.weight_decay:g} "
            f"({self.n_params} parameters)"
        )
        if spectrum.smallest is not None:
            exact = "" if inverse.negative_share is not None else " (Lanczos estimates)"
            hessian += (
                f": eigenvalues from {spectrum.smallest:.3g} to {spectrum.largest:.3g}{exact}"
            )
            if inverse.undamped_negative_share is not None:
                hessian += f", {inverse.undamped_negative_share:.1%} negative"
        damping = f"damping {self.damping:.3g}" + (
            f" (automatic: {AUTO_DAMPING_FACTOR:g} x the most negative eigenvalue)"
            if spectrum.auto
            else ""
        )
        if spectrum.smallest is None:
            lines.append(f"{hessian} + {damping}")
        else:
            lines += [hessian, damping]
        if self.solver == "explicit":
            lines[-1] += f"; damped, {inverse.negative_share:.1%} negative"
        elif self.solver == "cg":
            lines[-1] += (
                f"; {inverse.iterations} iterations, relative residual {inverse.residual:.2e}"
                + ("" if inverse.converged else " (not converged: raise --cg-max-iterations)")
            )
        else:
            lines[-1] += (
                f"; LiSSA scale {inverse.scale:.4g}, {inverse.iterations} steps, relative "
                f"residual {inverse.residual:.2e}"
            )
        if self.warning is not None:
            lines.append(f"warning: {self.warning}")
        lines.append(f"test loss {self.test_loss:.4f}")
        return lines + extremes_lines(self.total)


@reads_store
def run_influence(
    path: str | Path,
    config: InfluenceConfig | str = "test",
    *,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> InfluenceSummary:
    """Influence-function contributions C_IF(i) of every training sample to a test set at the
    final weights, written to `influence/<test set>` (of the results store `out` when given).

    `config` is an InfluenceConfig, or the test set's name with its fields as keyword options.
    Warns with IndefiniteHessianWarning (and says so in the summary) when the damped Hessian has
    negative eigenvalues. `inputs`: the model, data and loss given in Python."""
    config = resolve_config(InfluenceConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    run = load_recorded_run(path, config.test_set, inputs, dtype=torch.float64)
    results = results_root(path, out)
    model, layout, loss, train = run.model, run.layout, run.loss, run.train
    u, test_loss = mean_loss_gradient(
        model, layout, run.tests.inputs, run.tests.targets, batch_size=config.batch_size, loss=loss
    )
    hessian = TrainingHessian(
        model,
        layout,
        train.inputs,
        train.targets,
        get_flat_parameters(model, layout),
        weight_decay=run.final_weight_decay,
        loss=loss,
        batch_size=config.batch_size,
    )
    inverse, spectrum = inverse_hessian_product(hessian, u, config, progress)
    warning = None
    if inverse.indefinite:
        warning = indefinite_message(inverse, spectrum.damping)
        warnings.warn(warning, IndefiniteHessianWarning, stacklevel=3)
    dots = per_sample_directional_derivatives(
        model,
        layout,
        train.inputs,
        train.targets,
        inverse.solution,
        batch_size=config.batch_size,
        loss=loss,
    )
    values = (dots / run.n_train).cpu().numpy()
    seconds = time.perf_counter() - started
    step = int(run.trajectory.checkpoint_step[run.checkpoint])
    attrs = {
        "method": "influence functions (Koh & Liang)",
        "config": dataclasses.asdict(config),
        "test_set": config.test_set,
        "checkpoint": run.checkpoint,
        "step": step,
        "n_train": run.n_train,
        "weight_decay": run.final_weight_decay,
        "damping": spectrum.damping,
        "damping_automatic": spectrum.auto,
        "smallest_eigenvalue": spectrum.smallest,
        "largest_eigenvalue": spectrum.largest,
        "test_loss": test_loss,
        "seconds": seconds,
        "min_curvature": _finite_or_none(inverse.min_curvature),
        "negative_share": inverse.negative_share,
        "undamped_negative_share": inverse.undamped_negative_share,
        "iterations": inverse.iterations,
        "residual": inverse.residual,
        "lissa_scale": inverse.scale,
        "indefinite": bool(inverse.indefinite),
        "sign_convention": SIGN_CONVENTION,
    }
    name = f"{INFLUENCE_GROUP}/{run.tests.name}"
    long_name = "C(i) by influence functions at the final weights, (1/N) u . (H + damping I)^-1 g_i"
    write_result_group(results, name, total_arrays(train, values, long_name), attrs)
    return InfluenceSummary(
        path=results,
        group=name,
        test_set=run.tests.name,
        solver=config.solver,
        weight_decay=run.final_weight_decay,
        n_train=run.n_train,
        n_params=layout.n_params,
        checkpoint=run.checkpoint,
        step=step,
        test_loss=test_loss,
        seconds=seconds,
        spectrum=spectrum,
        inverse=inverse,
        total=values,
        warning=warning,
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def influence_label(attrs: dict[str, Any]) -> str:
    """The label `compare` and `validate` show for a stored influence-function run."""
    config = attrs.get("config") or {}
    damping = attrs.get("damping")
    damping = math.nan if damping is None else float(damping)
    return f"influence ({config.get('solver', '?')}, damping {damping:.3g})"


class InfluenceMethod(ContributionMethod):
    """Influence functions at the final weights (`influence/<test set>`)."""

    name = "influence"
    group = INFLUENCE_GROUP
    config_type = InfluenceConfig
    description = "influence functions at the final weights (Koh & Liang)"

    def run(
        self,
        path: Path,
        config: InfluenceConfig,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> InfluenceSummary:
        return run_influence(path, config, progress=progress, inputs=inputs, out=out)

    def totals(self, path: Path, test_set: str) -> Totals:
        found = read_total(path, self.group, test_set)
        if found is None:
            return {}
        index, values, attrs = found
        return {influence_label(attrs): (index, values)}
