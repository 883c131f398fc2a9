"""Influence functions at the weights of a checkpoint, by default the final ones (Koh & Liang,
2017), as a contribution method beside HyDRA: `analyze --method influence`, written to
`influence/<test set>`.

With the recorder's perturbation (sample i's loss weighted by ``1 + N eps_i``) and the training
objective ``J(w) = (1/N) sum_k l_k(w) + (lambda/2) |w|^2`` at a minimum w*, ``dw*/d eps_i =
-H^{-1} g_i`` (H the Hessian of J), so in HyDRA's convention

    C_IF(i) = -(1/N) u . dw*/d eps_i = (1/N) u . (H + delta I)^{-1} g_i

with u the mean test-loss gradient at the final weights and delta the damping. Leaving i out is
``eps_i = -1/N``, and C_IF(i) is the first-order change of the test loss: positive, i helps. On
a strongly convex problem trained to convergence it equals HyDRA's exact C(i) (the recurrence's
fixed point is ``h = -H^{-1} g_i``; tests/analysis/test_influence.py). The derivation, the
solvers and the measured default damping: docs/analysis.md, "Baselines".

Per test sample j (`per_test`): ``C_IF(i, j) = (1/N) g_j . (H + delta I)^{-1} g_i``, one solve
per test sample (explicit: the same eigendecomposition; cg and lissa: all test samples side by
side), whose mean over all test samples is C_IF(i). At an earlier checkpoint (`checkpoint`) the
same formula is evaluated at its weights, with the weight decay of the step ending there; the
automatic damping is chosen from that point's spectrum. `compare` scores it so at every
checkpoint (`InfluenceMethod.totals_at`).

The Hessian, its solves and the gradients are computed in float64 (the model is rebuilt in
float64 at the checkpoint's weights), whatever the store's dtype, on the config's `device` (None:
the CPU; the dense Hessian, its eigendecomposition and the Krylov vectors live there too).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.analysis.baselines import (
    PER_TEST,
    SIGN_CONVENTION,
    TOTAL,
    BaselineMethod,
    RecordedRun,
    checkpoint_attrs,
    chosen_test_samples,
    config_attrs,
    extremes_lines,
    load_recorded_run,
    per_test_arrays,
    per_test_gradients,
    total_arrays,
    training_dots,
)
from hydra_store.arguments import InfluenceConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.core.influence import (
    HESSIAN_BLOCK,
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


@dataclass
class DampedHessian:
    """``H + damping I`` of one run at one checkpoint, ready to be solved against any number of
    right-hand sides: the spectrum and damping it was given, and for the explicit solver the
    eigendecomposition (computed once, reused by every solve)."""

    hessian: TrainingHessian
    config: InfluenceConfig
    spectrum: Spectrum
    eigen: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def damping(self) -> float:
        return self.spectrum.damping

    def hessian_apply(
        self, vectors: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """H v for each row (over the samples `index`, None: all), in blocks of HESSIAN_BLOCK
        rows: many test samples at once would otherwise hold the activations of every row."""
        if vectors.shape[0] <= HESSIAN_BLOCK:
            return self.hessian.apply(vectors, index)
        return torch.cat(
            [
                self.hessian.apply(vectors[start : start + HESSIAN_BLOCK], index)
                for start in range(0, vectors.shape[0], HESSIAN_BLOCK)
            ]
        )

    def apply(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.hessian_apply(vectors) + self.damping * vectors

    def solve(self, b: torch.Tensor, progress: Progress | None = None) -> InverseResult:
        """``(H + damping I)^{-1} b`` for b (P,), or for each row of b (K, P) at once (explicit:
        one product with the eigenvectors; cg: K systems side by side; lissa: K right-hand sides
        through the same minibatches)."""
        config = self.config
        if self.eigen is not None:
            return explicit_solve(*self.eigen, self.damping, b)
        if config.solver == "cg":
            return conjugate_gradient(
                self.apply,
                b,
                tolerance=config.cg_tolerance,
                max_iterations=config.cg_max_iterations,
                progress=progress,
            )
        scale = config.lissa_scale
        if scale is None:
            scale = LISSA_SCALE_MARGIN * (float(self.spectrum.largest) + self.damping)
        result = lissa(
            self.hessian_apply,
            self.hessian.n,
            b,
            scale=scale,
            damping=self.damping,
            depth=config.lissa_depth,
            repeats=config.lissa_repeats,
            batch_size=config.lissa_batch_size,
            seed=config.seed,
            progress=progress,
        )
        # One product on all samples: how far the estimate is from solving the system, and the
        # curvature along it (negative: the damped Hessian is indefinite).
        x = result.solution.reshape(-1, b.shape[-1])
        rhs = b.reshape(-1, b.shape[-1])
        applied = self.apply(x)
        residual = torch.linalg.vector_norm(applied - rhs, dim=1) / torch.linalg.vector_norm(
            rhs, dim=1
        )
        squares = (x * x).sum(1)
        curvature = torch.where(squares > 0, (x * applied).sum(1) / squares, math.inf)
        return dataclasses.replace(
            result, residual=float(residual.max()), min_curvature=float(curvature.min())
        )


def damped_hessian(
    hessian: TrainingHessian, config: InfluenceConfig, progress: Progress | None = None
) -> DampedHessian:
    """The damped Hessian the configured solver works with: the eigendecomposition (explicit),
    or the Lanczos extremes where the automatic damping or LiSSA's scale needs them."""
    if config.solver == "explicit":
        eigenvalues, eigenvectors = torch.linalg.eigh(hessian.matrix(progress))
        smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
        spectrum = dataclasses.replace(choose_damping(smallest, config.damping), largest=largest)
        return DampedHessian(hessian, config, spectrum, (eigenvalues, eigenvectors))
    smallest = largest = None
    if config.damping is None or (config.solver == "lissa" and config.lissa_scale is None):
        smallest, largest = lanczos_extremes(
            hessian.apply,
            hessian.n_params,
            steps=LANCZOS_STEPS,
            seed=config.seed,
            dtype=hessian.point.dtype,
            device=hessian.point.device,
        )
    spectrum = dataclasses.replace(choose_damping(smallest, config.damping), largest=largest)
    return DampedHessian(hessian, config, spectrum)


def inverse_hessian_product(
    hessian: TrainingHessian,
    u: torch.Tensor,
    config: InfluenceConfig,
    progress: Progress | None = None,
) -> tuple[InverseResult, Spectrum]:
    """``(H + damping I)^{-1} u`` by the configured solver (H with weight decay), and the
    spectrum and damping it used."""
    damped = damped_hessian(hessian, config, progress)
    return damped.solve(u, progress), damped.spectrum


@dataclass
class InfluenceResult:
    """C_IF of every training sample at one checkpoint: the total, and per test sample when
    asked (None otherwise), with what the solver saw."""

    total: np.ndarray
    per_test: np.ndarray | None
    test_loss: float
    spectrum: Spectrum
    inverse: InverseResult
    per_test_inverse: InverseResult | None

    @property
    def indefinite(self) -> bool:
        return self.inverse.indefinite or bool(
            self.per_test_inverse is not None and self.per_test_inverse.indefinite
        )

    @property
    def worst(self) -> InverseResult:
        """Of the solves, the one that met the most negative curvature (for the warning)."""
        solves = [self.inverse] + ([self.per_test_inverse] if self.per_test_inverse else [])
        return min(
            solves, key=lambda r: math.inf if math.isnan(r.min_curvature) else r.min_curvature
        )


def influence_contributions(
    run: RecordedRun,
    config: InfluenceConfig,
    chosen: np.ndarray,
    progress: Progress | None = None,
) -> InfluenceResult:
    """C_IF(i) = (1/N) g_i . (H + damping I)^{-1} u at the run's checkpoint (the model in
    float64), and for each chosen test sample j C_IF(i, j) = (1/N) g_i . (H + damping I)^{-1}
    g_j (one solve per test sample, all at once)."""
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
        weight_decay=run.weight_decay,
        loss=loss,
        batch_size=config.batch_size,
    )
    damped = damped_hessian(hessian, config, progress)
    inverse = damped.solve(u, progress)
    total = training_dots(run, inverse.solution[None], config.batch_size)[:, 0] / run.n_train
    per_test = per_test_inverse = None
    if chosen.size:
        gradients = per_test_gradients(run, chosen, config.batch_size)
        per_test_inverse = damped.solve(gradients, progress)
        dots = training_dots(run, per_test_inverse.solution, config.batch_size)
        per_test = (dots / run.n_train).cpu().numpy()
    return InfluenceResult(
        total=total.cpu().numpy(),
        per_test=per_test,
        test_loss=test_loss,
        spectrum=damped.spectrum,
        inverse=inverse,
        per_test_inverse=per_test_inverse,
    )


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
        f"the damped Hessian (damping {damping:.3g}) is indefinite at the weights analysed: "
        f"{seen}; the influence scores are unreliable. {advice}, or leave it out (automatic)"
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
    per_test: np.ndarray | None = field(default=None, repr=False)
    test: np.ndarray | None = field(default=None, repr=False)
    per_test_inverse: InverseResult | None = field(default=None, repr=False)

    @property
    def damping(self) -> float:
        return self.spectrum.damping

    def lines(self) -> list[str]:
        inverse, spectrum = self.inverse, self.spectrum
        written = TOTAL + (
            f", {PER_TEST} for {self.test.size} test samples" if self.test is not None else ""
        )
        lines = [
            f"influence functions ({SOLVER_NAMES[self.solver]}) at checkpoint {self.checkpoint} "
            f"(step {self.step}): all {self.n_train} training samples against test set "
            f"{self.test_set!r}, in {self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: {written}",
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
        per_test = self.per_test_inverse
        if per_test is not None and self.solver == "cg":
            lines.append(
                f"per test sample: at most {per_test.iterations} iterations, largest relative "
                f"residual {per_test.residual:.2e}"
                + ("" if per_test.converged else " (not converged: raise --cg-max-iterations)")
            )
        elif per_test is not None and self.solver == "lissa":
            lines.append(f"per test sample: largest relative residual {per_test.residual:.2e}")
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
    weights of a checkpoint (`checkpoint`, default the last), and with `per_test` C_IF(i, j)
    for each chosen test sample, written to `influence/<test set>` (of the results store `out`
    when given).

    `config` is an InfluenceConfig, or the test set's name with its fields as keyword options.
    Warns with IndefiniteHessianWarning (and says so in the summary) when the damped Hessian has
    negative eigenvalues. `inputs`: the model, data and loss given in Python."""
    if isinstance(options.get("per_test"), Sequence):
        options["per_test"] = tuple(int(i) for i in options["per_test"])
    config = resolve_config(InfluenceConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    run = load_recorded_run(
        path,
        config.test_set,
        inputs,
        dtype=torch.float64,
        checkpoint=config.checkpoint,
        device=config.device,
    )
    chosen = chosen_test_samples(config.per_test, run.tests)
    results = results_root(path, out)
    found = influence_contributions(run, config, chosen, progress)
    inverse, spectrum = found.inverse, found.spectrum
    warning = None
    if found.indefinite:
        warning = indefinite_message(found.worst, spectrum.damping)
        warnings.warn(warning, IndefiniteHessianWarning, stacklevel=3)
    seconds = time.perf_counter() - started
    attrs = {
        "method": "influence functions (Koh & Liang)",
        "config": config_attrs(config),
        "test_set": config.test_set,
        **checkpoint_attrs(run),
        "n_train": run.n_train,
        "weight_decay": run.weight_decay,
        "damping": spectrum.damping,
        "damping_automatic": spectrum.auto,
        "smallest_eigenvalue": spectrum.smallest,
        "largest_eigenvalue": spectrum.largest,
        "test_loss": found.test_loss,
        "seconds": seconds,
        "min_curvature": _finite_or_none(found.worst.min_curvature),
        "negative_share": inverse.negative_share,
        "undamped_negative_share": inverse.undamped_negative_share,
        "iterations": inverse.iterations,
        "residual": inverse.residual,
        "lissa_scale": inverse.scale,
        "indefinite": found.indefinite,
        "sign_convention": SIGN_CONVENTION,
    }
    if found.per_test_inverse is not None:
        attrs["per_test_iterations"] = found.per_test_inverse.iterations
        attrs["per_test_residual"] = found.per_test_inverse.residual
    name = f"{INFLUENCE_GROUP}/{run.tests.name}"
    long_name = "C(i) by influence functions, (1/N) u . (H + damping I)^-1 g_i"
    arrays = total_arrays(run.train, found.total, long_name)
    arrays |= per_test_arrays(
        run.tests,
        chosen,
        found.per_test,
        "C(i, j) by influence functions, (1/N) g_j . (H + damping I)^-1 g_i",
    )
    write_result_group(results, name, arrays, attrs)
    return InfluenceSummary(
        path=results,
        group=name,
        test_set=run.tests.name,
        solver=config.solver,
        weight_decay=run.weight_decay,
        n_train=run.n_train,
        n_params=run.layout.n_params,
        checkpoint=run.checkpoint,
        step=run.step,
        test_loss=found.test_loss,
        seconds=seconds,
        spectrum=spectrum,
        inverse=inverse,
        total=found.total,
        warning=warning,
        per_test=found.per_test,
        test=chosen if chosen.size else None,
        per_test_inverse=found.per_test_inverse,
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def influence_label(attrs: dict[str, Any]) -> str:
    """The label `compare` and `validate` show for a stored influence-function run."""
    config = attrs.get("config") or {}
    damping = attrs.get("damping")
    damping = math.nan if damping is None else float(damping)
    return f"influence ({config.get('solver', '?')}, damping {damping:.3g})"


class InfluenceMethod(BaselineMethod):
    """Influence functions at the weights of a checkpoint (`influence/<test set>`)."""

    name = "influence"
    group = INFLUENCE_GROUP
    config_type = InfluenceConfig
    description = "influence functions at a checkpoint's weights (Koh & Liang)"

    def run(
        self,
        path: Path,
        config: InfluenceConfig,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> InfluenceSummary:
        return run_influence(path, config, progress=progress, inputs=inputs, out=out)

    def label(self, attrs: dict[str, Any]) -> str:
        return influence_label(attrs)

    def totals_at(
        self,
        path: Path,
        checkpoints: Sequence[int],
        config: InfluenceConfig,
        *,
        inputs: Any = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """C_IF(i) at the weights of each checkpoint (the damping chosen afresh at each when
        automatic), as `run_influence` computes them; nothing written, no warning."""
        config.validate()
        run = load_recorded_run(
            path, config.test_set, inputs, dtype=torch.float64, device=config.device
        )
        out = np.zeros((len(checkpoints), run.n_train))
        for row, k in enumerate(checkpoints):
            found = influence_contributions(run.at(k), config, np.zeros(0, dtype=np.int64))
            out[row] = found.total
            if progress is not None:
                progress("influence over checkpoints", row + 1, len(checkpoints))
        return out

    def default_checkpoint_config(self, test_set: str) -> InfluenceConfig:
        """Conjugate gradients with the automatic damping: on the default digits run as accurate
        as the explicit solver to every printed digit at a twentieth of its cost
        (docs/analysis.md, "Baselines")."""
        return InfluenceConfig(test_set=test_set, solver="cg")

    def config_label(self, config: InfluenceConfig) -> str:
        damping = "automatic" if config.damping is None else f"{config.damping:g}"
        return f"influence ({config.solver}, damping {damping})"
