"""Compare contribution methods against the exact (reverse-mode, Hessian-aware) contribution of
every training sample: sign error rate and Spearman correlation, at the end of training and over
checkpoints (the paper's Figures 4 and 5, measured on all N training samples)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hydra_store.analysis.methods import MethodRegistry, ReverseModeMethod, default_methods
from hydra_store.analysis.metrics import pearson, sign_error_rate, spearman
from hydra_store.analysis.reverse import (
    adjoint_contributions,
    read_reverse_group,
    run_exact_analysis,
)
from hydra_store.analysis.test_sets import group_name, resolve_test_set
from hydra_store.arguments import CompareConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.errors import AnalysisError, InvalidArgumentError
from hydra_store.replay.recorded_run import RunInputs, load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

# The paper's approximation study (HyDRA against its exact mode, Fashion-MNIST, 500 tracked
# training samples, end of training): shown beside what we measure.
PAPER_SIGN_ERROR = 0.014
PAPER_SPEARMAN = 0.986


def exact_totals(
    path: str | Path,
    test_set: str,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(exact C(i), approximate C(i)) for all N from `reverse/<test set>` (of the results store
    `out` when given), computing it first when absent (then the third item is True)."""
    results = results_root(path, out)
    group = read_reverse_group(results, test_set)
    computed = False
    if group is None or "total_contribution_exact" not in group:
        run_exact_analysis(path, test_set, progress=progress, inputs=inputs, out=out)
        group = read_reverse_group(results, test_set)
        computed = True
    last = open_group(path)["checkpoint_step"].shape[0] - 1
    if group is None or group.attrs.get("checkpoint") != last:
        raise AnalysisError(
            f"reverse/{group_name(test_set)} was computed at a truncated checkpoint; rerun "
            "`hydra-store analyze --method hydra-exact` without --checkpoint"
        )
    exact = np.asarray(group["total_contribution_exact"][:], dtype=np.float64)
    approx = np.asarray(group["total_contribution_approx"][:], dtype=np.float64)
    return exact, approx, computed


@dataclass
class MethodScore:
    method: str
    n_samples: int
    sign_error: float
    spearman: float
    pearson: float


@dataclass
class ComparisonSummary:
    path: Path
    test_set: str
    n_train: int
    scores: list[MethodScore]
    checkpoint_step: np.ndarray = field(repr=False)
    checkpoint_sign_error: np.ndarray = field(repr=False)
    checkpoint_spearman: np.ndarray = field(repr=False)
    png: Path | None
    computed_exact: bool
    seconds: float

    def lines(self) -> list[str]:
        out = []
        if self.computed_exact:
            out.append(f"computed the exact contributions first (reverse/{self.test_set})")
        out += [
            f"against the exact (Hessian-aware) contribution of all {self.n_train} training "
            f"samples, test set {self.test_set!r}:",
            f"{'method':<44} {'samples':>8} {'sign error':>11} {'Spearman':>9} {'Pearson':>8}",
        ]
        for s in self.scores:
            out.append(
                f"{s.method:<44} {s.n_samples:>8} {s.sign_error:>11.4f} {s.spearman:>9.4f} "
                f"{s.pearson:>8.4f}"
            )
        out.append(
            f"{'paper, HyDRA (Fashion-MNIST, 500 tracked)':<44} {500:>8} "
            f"{PAPER_SIGN_ERROR:>11.4f} {PAPER_SPEARMAN:>9.4f} {'':>8}"
        )
        if self.checkpoint_step.size:
            out.append("approximate against exact over checkpoints (step: sign error, Spearman):")
            out.append(
                "  "
                + "; ".join(
                    f"{int(t)}: {e:.3f}, {r:.3f}"
                    for t, e, r in zip(
                        self.checkpoint_step,
                        self.checkpoint_sign_error,
                        self.checkpoint_spearman,
                        strict=True,
                    )
                )
            )
        if self.png is not None:
            out.append(f"plot: {self.png}")
        out.append(f"written to {self.path}/reverse/{self.test_set}/comparison")
        return out


def checkpoint_study(
    path: str | Path,
    test_set: str = "test",
    *,
    every: int = 1,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(checkpoint steps, sign error, Spearman) of approximate against exact at checkpoints
    1, 1+every, ..., and the last: each by an adjoint truncated at the checkpoint, with the
    test direction taken at its weights. Costs about K/2 full sweeps for K checkpoints."""
    if every < 1:
        raise InvalidArgumentError(f"--every must be >= 1, got {every}")
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    data = load_run_data(path, inputs)
    tests = resolve_test_set(path, test_set, run=data)
    last = len(trajectory.checkpoint_step) - 1
    chosen = sorted(set(range(1, last + 1, every)) | {last}) if last >= 1 else []
    steps, errors, correlations = [], [], []
    scratch = model_at_checkpoint(path, 0, inputs=inputs)
    for n, k in enumerate(chosen, start=1):
        model = model_at_checkpoint(path, k, inputs=inputs)
        u, _ = mean_loss_gradient(
            model, trajectory.layout, tests.inputs, tests.targets, loss=trajectory.loss
        )
        result = adjoint_contributions(trajectory, scratch, data.train, u[None], checkpoint=k)
        steps.append(int(trajectory.checkpoint_step[k]))
        errors.append(sign_error_rate(result.approx[0], result.exact[0]))
        correlations.append(spearman(result.approx[0], result.exact[0]))
        if progress is not None:
            progress("checkpoints", n, len(chosen))
    return np.array(steps, dtype=np.int64), np.array(errors), np.array(correlations)


def plot_checkpoints(
    out: Path, steps: np.ndarray, errors: np.ndarray, correlations: np.ndarray, title: str
) -> None:
    """Sign error rate and Spearman correlation over checkpoints, as a PNG (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hydra_store.analysis.plots import save_png

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.plot(steps, errors, marker="o", label="HyDRA approximate (all samples)")
    left.axhline(PAPER_SIGN_ERROR, ls="--", c="gray", label="paper, end (Fashion-MNIST)")
    left.set_xlabel("training step")
    left.set_ylabel("sign error rate")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(steps, correlations, marker="o", label="HyDRA approximate (all samples)")
    right.axhline(PAPER_SPEARMAN, ls="--", c="gray", label="paper, end (Fashion-MNIST)")
    right.set_xlabel("training step")
    right.set_ylabel("Spearman vs exact")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, out, dpi=110)
    plt.close(fig)


@reads_store
def run_comparison(
    path: str | Path,
    config: CompareConfig | str = "test",
    *,
    progress: Progress | None = None,
    methods: MethodRegistry | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> ComparisonSummary:
    """Score the approximate HyDRA contribution (and the stored C(i) of every method in
    `methods`, default: the built-in ones) against the exact contribution, write the table (and
    the per-checkpoint curves) to `reverse/<test set>/comparison`, and plot them to `png`
    (default: `<store>-compare-<test set>.png` beside the store). `config` is a CompareConfig,
    or the test set's name with its fields as keyword options. `inputs`: the model, data and
    loss given in Python (`hydra_store.RunInputs`), for a store that does not name them. `out`:
    a results store to read and write the result groups in instead of the recording (the PNG
    then goes beside it)."""
    if options.get("png") is not None:
        options["png"] = str(options["png"])
    config = resolve_config(CompareConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    require_complete(open_group(path), path)
    test_set, name = config.test_set, group_name(config.test_set)
    exact, approx, computed = exact_totals(path, test_set, progress, inputs, out)
    results = results_root(path, out)
    scored = {"hydra-approx (reverse mode, all samples)": (np.arange(exact.size), approx)}
    for label, totals in (methods or default_methods()).totals(results, test_set).items():
        if label not in (ReverseModeMethod.EXACT, ReverseModeMethod.APPROXIMATE):
            scored[label] = totals
    scores = [
        MethodScore(
            label,
            int(index.size),
            sign_error_rate(values, exact[index]),
            spearman(values, exact[index]),
            pearson(values, exact[index]),
        )
        for label, (index, values) in scored.items()
    ]
    steps = np.zeros(0, dtype=np.int64)
    errors = correlations = np.zeros(0)
    png_path = None
    if config.over_checkpoints:
        steps, errors, correlations = checkpoint_study(
            path, test_set, every=config.every, progress=progress, inputs=inputs
        )
        png_path = (
            store_path(config.png)
            if config.png is not None
            else results.with_name(f"{results.stem}-compare-{name}.png")
        )
        plot_checkpoints(
            png_path,
            steps,
            errors,
            correlations,
            f"HyDRA approximate vs exact, all {exact.size} training samples ({path.name})",
        )
    arrays = _comparison_arrays(scores, steps, errors, correlations)
    attrs = {
        "config": asdict(config),
        "gold_standard": "total_contribution_exact (reverse mode)",
        "paper_sign_error": PAPER_SIGN_ERROR,
        "paper_spearman": PAPER_SPEARMAN,
        "png": str(png_path) if png_path else None,
    }
    write_result_group(results, f"reverse/{name}/comparison", arrays, attrs)
    return ComparisonSummary(
        path=results,
        test_set=name,
        n_train=int(exact.size),
        scores=scores,
        checkpoint_step=steps,
        checkpoint_sign_error=errors,
        checkpoint_spearman=correlations,
        png=png_path,
        computed_exact=computed,
        seconds=time.perf_counter() - started,
    )


def _comparison_arrays(
    scores: list[MethodScore], steps: np.ndarray, errors: np.ndarray, correlations: np.ndarray
) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict]]:
    """The variables of `reverse/<test set>/comparison`: one row per method, one per
    checkpoint."""
    per_method = {
        "method": np.array([s.method for s in scores], dtype=object),
        "n_samples": np.array([s.n_samples for s in scores]),
        "sign_error": np.array([s.sign_error for s in scores]),
        "spearman": np.array([s.spearman for s in scores]),
        "pearson": np.array([s.pearson for s in scores]),
    }
    arrays = {key: (values, ("method",), {}) for key, values in per_method.items()}
    arrays["checkpoint_step"] = (steps, ("checkpoint",), {})
    arrays["checkpoint_sign_error"] = (errors, ("checkpoint",), {})
    arrays["checkpoint_spearman"] = (correlations, ("checkpoint",), {})
    return arrays
