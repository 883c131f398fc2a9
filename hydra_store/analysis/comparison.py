"""Compare contribution methods against the exact (reverse-mode, Hessian-aware) contribution of
every training sample: sign error rate and Spearman correlation, at the end of training and over
checkpoints (the paper's Figures 4 and 5, measured on all N training samples, for HyDRA's
approximation and every method that gives C(i) at any checkpoint: influence functions, TracIn,
TRAK-style)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hydra_store.analysis.baselines import computed_before_last
from hydra_store.analysis.methods import (
    ContributionMethod,
    MethodRegistry,
    ReverseModeMethod,
    default_methods,
)
from hydra_store.analysis.metrics import pearson, sign_error_rate, spearman
from hydra_store.analysis.reverse import (
    adjoint_contributions_at_checkpoints,
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

# The paper's approximation study (Figures 4 and 5: HyDRA's approximation and influence
# functions against the Hessian-aware contribution, Fashion-MNIST, 500 tracked training samples,
# the values they converge to, mean of the last epochs; standard deviations 0.002, 0.002, 0.013,
# 0.024): shown beside what we measure.
PAPER_SIGN_ERROR = 0.014
PAPER_SPEARMAN = 0.986
PAPER_INFLUENCE_SIGN_ERROR = 0.130
PAPER_INFLUENCE_SPEARMAN = 0.820
PAPER_REFERENCES = (
    ("paper, HyDRA (Fashion-MNIST, 500 tracked)", PAPER_SIGN_ERROR, PAPER_SPEARMAN),
    (
        "paper, influence functions (Fashion-MNIST)",
        PAPER_INFLUENCE_SIGN_ERROR,
        PAPER_INFLUENCE_SPEARMAN,
    ),
)
HYDRA_CURVE = "hydra-approx (reverse mode)"


def exact_totals(
    path: str | Path,
    test_set: str,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(exact C(i), approximate C(i)) for all N from `reverse/<test set>` (of the results store
    `out` when given), computing it first on `device` (None: the CPU) when absent (then the
    third item is True)."""
    results = results_root(path, out)
    group = read_reverse_group(results, test_set)
    computed = False
    if group is None or "total_contribution_exact" not in group:
        run_exact_analysis(path, test_set, progress=progress, inputs=inputs, out=out, device=device)
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
class CheckpointStudy:
    """Each method scored against the exact contribution of all N training samples at each
    chosen checkpoint (the paper's Figures 4 and 5): row 0 is HyDRA's approximation (from the
    same adjoint sweep as the exact contribution), the others the methods that give C(i) at any
    checkpoint. `seconds`: each row's cost (row 0: the sweep, which also gives the exact C(i));
    `errors`: why a row has no scores (None when it has)."""

    checkpoint: np.ndarray
    step: np.ndarray
    labels: list[str]
    names: list[str]
    sign_error: np.ndarray
    spearman: np.ndarray
    seconds: np.ndarray
    configs: list[dict[str, Any] | None]
    stored: list[bool]
    errors: list[str | None]

    @classmethod
    def empty(cls) -> CheckpointStudy:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, [], [], np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0), [], [], [])


@dataclass
class ComparisonSummary:
    path: Path
    test_set: str
    n_train: int
    scores: list[MethodScore]
    study: CheckpointStudy = field(repr=False)
    png: Path | None
    computed_exact: bool
    seconds: float
    skipped: list[str] = field(default_factory=list)

    @property
    def checkpoint_step(self) -> np.ndarray:
        return self.study.step

    @property
    def checkpoint_sign_error(self) -> np.ndarray:
        """HyDRA's approximation over checkpoints."""
        return self.study.sign_error[0] if self.study.labels else np.zeros(0)

    @property
    def checkpoint_spearman(self) -> np.ndarray:
        return self.study.spearman[0] if self.study.labels else np.zeros(0)

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
        for label, error, rho in PAPER_REFERENCES:
            out.append(f"{label:<44} {500:>8} {error:>11.4f} {rho:>9.4f} {'':>8}")
        out += [f"skipped {line}" for line in self.skipped]
        study = self.study
        if study.step.size:
            out.append(
                "over checkpoints (step: sign error, Spearman), each against the exact "
                "contribution at that checkpoint:"
            )
            for row, label in enumerate(study.labels):
                origin = (
                    "" if row == 0 else (", as last run" if study.stored[row] else ", defaults")
                )
                head = f"  {label} ({study.seconds[row]:.1f} s{origin})"
                if study.errors[row] is not None:
                    out.append(f"{head}: not scored: {study.errors[row]}")
                    continue
                out.append(
                    f"{head}: "
                    + "; ".join(
                        f"{int(t)}: {e:.3f}, {r:.3f}"
                        for t, e, r in zip(
                            study.step, study.sign_error[row], study.spearman[row], strict=True
                        )
                    )
                )
        if self.png is not None:
            out.append(f"plot: {self.png}")
        out.append(f"written to {self.path}/reverse/{self.test_set}/comparison")
        return out


def checkpoint_methods(
    registry: MethodRegistry, names: tuple[str, ...] | None
) -> list[ContributionMethod]:
    """The methods `compare` scores over checkpoints: those named (each must give C(i) at any
    checkpoint), or with None every such method in the registry."""
    capable = [m for m in registry if m.scores_checkpoints]
    if names is None:
        return capable
    choices = ", ".join(m.name for m in capable) + (", or " if capable else "") + "'none'"
    chosen = []
    for name in names:
        if name not in registry.names():
            raise InvalidArgumentError(
                f"--checkpoint-methods: unknown method {name!r}; choose among {choices}"
            )
        method = registry[name]
        if not method.scores_checkpoints:
            raise InvalidArgumentError(
                f"--checkpoint-methods: {name!r} gives no C(i) at earlier checkpoints; choose "
                f"among {choices}"
            )
        if method not in chosen:
            chosen.append(method)
    return chosen


def checkpoint_study(
    path: str | Path,
    test_set: str = "test",
    *,
    every: int = 1,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    methods: Sequence[tuple[ContributionMethod, Any, bool]] = (),
    device: str | None = None,
) -> CheckpointStudy:
    """Score HyDRA's approximation and each of `methods` ((method, its config, whether the
    config is the one it last ran with)) against the exact contribution at checkpoints 1,
    1+every, ..., and the last. The exact and approximate C(i) at a checkpoint are those of an
    adjoint truncated there, with the test direction taken at its weights, all from one
    backward sweep from the last checkpoint (`adjoint_contributions_at_checkpoints`: one replay
    of the trajectory, the same C(i) to the bit as one truncated sweep per checkpoint); each
    method's from its `totals_at`, computed as it would be by a run with `checkpoint=k` (a
    method that fails gets a row of NaN and its error). `device`: where the test directions are
    taken and the sweep runs (None: the CPU); each method runs where its config says
    (`ContributionMethod.checkpoint_config` gives it `run_comparison`'s device)."""
    if every < 1:
        raise InvalidArgumentError(f"--every must be >= 1, got {every}")
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    data = load_run_data(path, inputs)
    tests = resolve_test_set(path, test_set, run=data)
    last = len(trajectory.checkpoint_step) - 1
    chosen = sorted(set(range(1, last + 1, every)) | {last}) if last >= 1 else []
    rows = 1 + len(methods)
    errors = np.full((rows, len(chosen)), np.nan)
    correlations = np.full((rows, len(chosen)), np.nan)
    seconds = np.zeros(rows)
    failures: list[str | None] = [None] * rows
    predicted: list[np.ndarray | None] = [None] * rows
    for row, (method, config, _) in enumerate(methods, start=1):
        started = time.perf_counter()
        try:
            predicted[row] = method.totals_at(
                path, chosen, config, inputs=inputs, progress=progress
            )
        except (AnalysisError, InvalidArgumentError) as error:
            failures[row] = str(error)
        seconds[row] = time.perf_counter() - started
    started = time.perf_counter()
    directions = {}
    for k in chosen:
        model = model_at_checkpoint(path, k, inputs=inputs, device=device)
        u, _ = mean_loss_gradient(
            model, trajectory.layout, tests.inputs, tests.targets, loss=trajectory.loss
        )
        directions[k] = u[None]
    adjoints = (
        adjoint_contributions_at_checkpoints(
            trajectory,
            model_at_checkpoint(path, 0, inputs=inputs, device=device),
            data.train,
            directions,
            progress=progress,
            description="reverse sweep, all checkpoints",
        )
        if chosen
        else {}
    )
    seconds[0] = time.perf_counter() - started
    for column, k in enumerate(chosen):
        exact = adjoints[k].exact[0]
        for row in range(rows):
            values = adjoints[k].approx[0] if row == 0 else predicted[row]
            if values is None:
                continue
            values = values if row == 0 else values[column]
            errors[row, column] = sign_error_rate(values, exact)
            correlations[row, column] = spearman(values, exact)
    return CheckpointStudy(
        checkpoint=np.asarray(chosen, dtype=np.int64),
        step=np.asarray([int(trajectory.checkpoint_step[k]) for k in chosen], dtype=np.int64),
        labels=[HYDRA_CURVE] + [m.config_label(c) for m, c, _ in methods],
        names=[ReverseModeMethod.name] + [m.name for m, _, _ in methods],
        sign_error=errors,
        spearman=correlations,
        seconds=seconds,
        configs=[None] + [_config_dict(c) for _, c, _ in methods],
        stored=[True] + [bool(s) for _, _, s in methods],
        errors=failures,
    )


def _config_dict(config: Any) -> dict[str, Any]:
    values = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def plot_checkpoints(out: Path, study: CheckpointStudy, title: str) -> None:
    """The paper's Figures 4 and 5 side by side, as a PNG (Agg backend): sign error rate and
    Spearman correlation against the exact contribution over checkpoints, one line per method,
    and the paper's end-of-training values (Fashion-MNIST) as dashed reference lines in the
    colour of the method they belong to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hydra_store.analysis.plots import save_png

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour_of = {}
    for row, label in enumerate(study.labels):
        colour = colours[row % len(colours)]
        colour_of.setdefault(study.names[row], colour)
        if study.errors[row] is not None:
            continue
        left.plot(study.step, study.sign_error[row], marker="o", ms=3, c=colour, label=label)
        right.plot(study.step, study.spearman[row], marker="o", ms=3, c=colour, label=label)
    for name, (label, error, rho) in zip(
        (ReverseModeMethod.name, "influence"), PAPER_REFERENCES, strict=True
    ):
        colour = colour_of.get(name, "gray")
        text = f"{label}, end: sign error {error}, Spearman {rho}"
        left.axhline(error, ls="--", lw=1, c=colour, label=text)
        right.axhline(rho, ls="--", lw=1, c=colour, label=text)
    left.set_xlabel("training step")
    left.set_ylabel("sign error rate vs exact")
    left.set_title("sign error (the paper's Figure 4)", fontsize=10)
    left.set_ylim(bottom=0)
    right.set_xlabel("training step")
    right.set_ylabel("Spearman vs exact")
    right.set_title("rank correlation (the paper's Figure 5)", fontsize=10)
    handles, labels = right.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 * ((len(labels) + 2) // 3), 1, 1))
    save_png(fig, out, dpi=110)
    plt.close(fig)


def skipped_results(results: Path, test_set: str, registry: MethodRegistry) -> list[str]:
    """The result groups `compare` leaves out because they were computed at a checkpoint before
    the last (their C(i) describes another model than the exact contribution's)."""
    root = open_group(results)
    found = []
    for method in registry:
        name = f"{method.group}/{group_name(test_set)}"
        try:
            attrs = root[name].attrs
        except KeyError:
            continue
        if method.group != ReverseModeMethod.group and computed_before_last(attrs):
            found.append(
                f"{name}: computed at checkpoint {attrs['checkpoint']}, not the last; rerun "
                f"`hydra-store analyze --method {method.name}` without --checkpoint"
            )
    return found


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
    or the test set's name with its fields as keyword options.

    Over checkpoints (`over_checkpoints`), every method of `methods` that gives C(i) at any
    checkpoint (`ContributionMethod.totals_at`; or those `checkpoint_methods` names) is scored
    beside HyDRA's approximation, with the arguments it last ran with on this test set, or
    its defaults for this study when it has not run (`default_checkpoint_config`).
    `inputs`: the model, data and loss given in Python (`hydra_store.RunInputs`), for a store
    that does not name them. `out`: a results store to read and write the result groups in
    instead of the recording (the PNG then goes beside it). `device`: where the reverse sweeps
    run (over checkpoints, and the exact C(i) when not stored yet) and the checkpoint methods
    that take a device run (a stored config's own device is not kept: `checkpoint_config`); a
    run whose dropout masks were drawn on a GPU replays only there."""
    if options.get("png") is not None:
        options["png"] = str(options["png"])
    if isinstance(options.get("checkpoint_methods"), (list, tuple)):
        options["checkpoint_methods"] = tuple(options["checkpoint_methods"])
    config = resolve_config(CompareConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    require_complete(open_group(path), path)
    registry = methods or default_methods()
    over = (
        checkpoint_methods(registry, config.checkpoint_methods) if config.over_checkpoints else []
    )
    test_set, name = config.test_set, group_name(config.test_set)
    exact, approx, computed = exact_totals(path, test_set, progress, inputs, out, config.device)
    results = results_root(path, out)
    scored = {"hydra-approx (reverse mode, all samples)": (np.arange(exact.size), approx)}
    for label, totals in registry.totals(results, test_set).items():
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
    study = CheckpointStudy.empty()
    png_path = None
    if config.over_checkpoints:
        configured = [(m, *m.checkpoint_config(results, test_set, config.device)) for m in over]
        study = checkpoint_study(
            path,
            test_set,
            every=config.every,
            progress=progress,
            inputs=inputs,
            methods=configured,
            device=config.device,
        )
        png_path = (
            store_path(config.png)
            if config.png is not None
            else results.with_name(f"{results.stem}-compare-{name}.png")
        )
        plot_checkpoints(
            png_path,
            study,
            f"against the exact contribution of all {exact.size} training samples "
            f"({path.name}, test set {test_set!r})",
        )
    attrs = {
        "config": _config_dict(config),
        "gold_standard": "total_contribution_exact (reverse mode)",
        "paper_sign_error": PAPER_SIGN_ERROR,
        "paper_spearman": PAPER_SPEARMAN,
        "paper_influence_sign_error": PAPER_INFLUENCE_SIGN_ERROR,
        "paper_influence_spearman": PAPER_INFLUENCE_SPEARMAN,
        "checkpoint_method_config": study.configs,
        "checkpoint_method_stored_config": study.stored,
        "checkpoint_method_error": study.errors,
        "png": str(png_path) if png_path else None,
    }
    write_result_group(
        results, f"reverse/{name}/comparison", _comparison_arrays(scores, study), attrs
    )
    return ComparisonSummary(
        path=results,
        test_set=name,
        n_train=int(exact.size),
        scores=scores,
        study=study,
        png=png_path,
        computed_exact=computed,
        seconds=time.perf_counter() - started,
        skipped=skipped_results(results, test_set, registry),
    )


def _comparison_arrays(
    scores: list[MethodScore], study: CheckpointStudy
) -> dict[str, tuple[np.ndarray, tuple[str, ...], dict]]:
    """The variables of `reverse/<test set>/comparison`: one row per method at the end of
    training; over checkpoints, one row per method scored there (`checkpoint_method`; row 0,
    HyDRA's approximation, is also `checkpoint_sign_error` and `checkpoint_spearman`)."""
    per_method = {
        "method": np.array([s.method for s in scores], dtype=object),
        "n_samples": np.array([s.n_samples for s in scores]),
        "sign_error": np.array([s.sign_error for s in scores]),
        "spearman": np.array([s.spearman for s in scores]),
        "pearson": np.array([s.pearson for s in scores]),
    }
    arrays = {key: (values, ("method",), {}) for key, values in per_method.items()}
    first = (lambda a: a[0]) if study.labels else (lambda a: np.zeros(0))
    curves = ("checkpoint_method", "checkpoint")
    arrays |= {
        "checkpoint": (study.checkpoint, ("checkpoint",), {}),
        "checkpoint_step": (study.step, ("checkpoint",), {}),
        "checkpoint_sign_error": (first(study.sign_error), ("checkpoint",), {}),
        "checkpoint_spearman": (first(study.spearman), ("checkpoint",), {}),
        "checkpoint_method": (np.array(study.labels, dtype=object), ("checkpoint_method",), {}),
        "checkpoint_method_name": (
            np.array(study.names, dtype=object),
            ("checkpoint_method",),
            {"long_name": "the method's registry name"},
        ),
        "checkpoint_method_seconds": (
            study.seconds,
            ("checkpoint_method",),
            {"long_name": "seconds spent computing its C(i) over the checkpoints"},
        ),
        "sign_error_over_checkpoints": (
            study.sign_error.reshape(len(study.labels), study.checkpoint.size),
            curves,
            {"long_name": "sign error rate against the exact C(i) at each checkpoint"},
        ),
        "spearman_over_checkpoints": (
            study.spearman.reshape(len(study.labels), study.checkpoint.size),
            curves,
            {"long_name": "Spearman correlation with the exact C(i) at each checkpoint"},
        ),
    }
    return arrays
