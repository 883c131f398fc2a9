"""Ground truth by retraining: the stored trajectory replayed with per-sample loss weights.

Perturbing sample i by eps_i scales its loss in every batch it is drawn into by (1 + N eps_i)
(that is the `(N / B_t) g_{t,i}` injection of the recurrence), so leave-one-out is the weight 0,
eps_i = -1/N, and the first-order prediction of the test-loss change is exactly C(i) =
-(1/N) u . dw_T/d eps_i. `validate` retrains K samples out, each an independent dask task over
the same batches and learning rates, and correlates each method's C(i) with the measured change.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hydra_store.analysis.comparison import exact_totals
from hydra_store.analysis.methods import MethodRegistry, default_methods
from hydra_store.analysis.metrics import pearson, spearman
from hydra_store.analysis.reverse import flush_denormals, read_reverse_group, run_exact_analysis
from hydra_store.analysis.test_sets import group_name, resolve_test_set
from hydra_store.arguments import SELECTIONS, ReverseConfig, ValidateConfig, resolve_config
from hydra_store.core.gradients import evaluate, evaluation_mode, weighted_batch_gradient
from hydra_store.core.losses import PerSampleLoss
from hydra_store.core.model_state import step_randomness
from hydra_store.core.parameters import get_flat_parameters
from hydra_store.core.sgd import SGDSettings, run_steps, sgd_optimizer
from hydra_store.data.datasets import Split
from hydra_store.errors import InvalidArgumentError
from hydra_store.execution import map_tasks
from hydra_store.replay.recorded_run import RunInputs, load_run_data, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.format import open_group, require_complete
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]


def retrain_weighted(
    trajectory: Trajectory,
    model: torch.nn.Module,
    train: Split,
    sample_weights: np.ndarray | None,
    *,
    batches: Sequence[np.ndarray] | None = None,
    settings: Sequence[SGDSettings] | None = None,
) -> torch.Tensor:
    """Retrain from checkpoint 0 through the stored batches and learning rates with the loss of
    sample i scaled by `sample_weights[i]` (None: all 1); return the final flat weights.

    The batch gradient is the mean over the batch's slots of weight x per-sample gradient, taken
    by one backward pass (plain training cost). `model` is overwritten.
    """
    layout = trajectory.layout
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    batches = batches if batches is not None else trajectory.batches(0, trajectory.n_steps)
    settings = settings if settings is not None else trajectory.settings(0, trajectory.n_steps)
    weights = torch.ones(trajectory.n_train, dtype=dtype, device=device)
    loss = trajectory.loss
    if sample_weights is not None:
        weights = torch.as_tensor(np.asarray(sample_weights), dtype=dtype, device=device)
    trajectory.check_mask_device(device)
    trajectory.load_checkpoint(model, 0)
    model.train()
    if np.any(trajectory.velocity(0) != 0):
        raise InvalidArgumentError("retraining needs checkpoint 0 at the start of training")
    optimizer = sgd_optimizer(model, layout, settings[0] if settings else None)
    inputs, targets = train.inputs, train.targets
    current = [0]

    def gradient_of(batch: np.ndarray) -> torch.Tensor:
        index = torch.from_numpy(np.asarray(batch, dtype=np.int64))
        x, y = inputs[index].to(device, dtype), targets[index].to(device)
        with step_randomness(trajectory.step_seed(current[0]), device):
            return weighted_batch_gradient(model, layout, x, y, weights[index.to(device)], loss)

    steps = zip(batches, settings, strict=True)
    for k, _, _ in run_steps(model, optimizer, layout, steps, gradient_of):
        current[0] = k + 1
    return get_flat_parameters(model, layout)


@functools.lru_cache(maxsize=4)
def _context(path: str, test_set: str, inputs: RunInputs | None):
    """What every retraining task of one store needs, loaded once per process."""
    trajectory = Trajectory(path, loss=inputs.loss if inputs is not None else None)
    data = load_run_data(path, inputs)
    tests = resolve_test_set(path, test_set, run=data)
    batches = trajectory.batches(0, trajectory.n_steps)
    settings = trajectory.settings(0, trajectory.n_steps)
    return trajectory, data.train, tests, batches, settings


def retrained_test_loss(
    path: str,
    test_set: str,
    weights: dict[int, float],
    inputs: RunInputs | None = None,
    device: str | None = None,
) -> float:
    """One task: retrain with the given per-sample loss weights (others 1) on `device` (None:
    the CPU); the test loss."""
    trajectory, train, tests, batches, settings = _context(path, test_set, inputs)
    model = model_at_checkpoint(path, 0, inputs=inputs, device=device)
    sample_weights = np.ones(trajectory.n_train)
    for i, w in weights.items():
        sample_weights[i] = w
    with flush_denormals():
        retrain_weighted(
            trajectory, model, train, sample_weights, batches=batches, settings=settings
        )
    return evaluate(model, tests.inputs, tests.targets, loss=trajectory.loss)[0]


def per_sample_losses(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    loss: PerSampleLoss,
    batch_size: int = 1024,
) -> np.ndarray:
    """The loss of every given sample (float64, (n,)), taken as `evaluate` takes the mean: the
    model in eval mode, in batches, without gradients."""
    param = next(model.parameters())
    out = []
    with torch.no_grad(), evaluation_mode(model):
        for start in range(0, int(targets.shape[0]), batch_size):
            x = inputs[start : start + batch_size].to(param.device, param.dtype)
            y = targets[start : start + batch_size].to(param.device)
            out.append(loss(model(x), y).detach().to("cpu", torch.float64).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def retrained_test_losses(
    path: str,
    test_set: str,
    sample_weights: np.ndarray | None,
    inputs: RunInputs | None = None,
    device: str | None = None,
) -> np.ndarray:
    """One task: retrain with the per-sample loss weights `sample_weights` (N,) (None: all 1)
    on `device` (None: the CPU); the loss of every test sample, (n_test,) float64 (what
    `retrained_test_loss` averages)."""
    trajectory, train, tests, batches, settings = _context(path, test_set, inputs)
    model = model_at_checkpoint(path, 0, inputs=inputs, device=device)
    with flush_denormals():
        retrain_weighted(
            trajectory, model, train, sample_weights, batches=batches, settings=settings
        )
    return per_sample_losses(model, tests.inputs, tests.targets, loss=trajectory.loss)


def clear_context_cache() -> None:
    """Forget the trajectories and data the retraining tasks of this process loaded: a store
    may have changed since an earlier call."""
    _context.cache_clear()


def choose_samples(exact: np.ndarray, count: int, selection: str, seed: int) -> np.ndarray:
    """K training samples: at random, the K largest |C_exact|, or half of each ('mixed')."""
    n = exact.size
    if not 1 <= count <= n:
        raise InvalidArgumentError(f"--samples {count}: choose 1..{n} training samples")
    if selection not in SELECTIONS:
        raise InvalidArgumentError(
            f"--selection must be one of {', '.join(SELECTIONS)}, got {selection!r}"
        )
    rng = np.random.default_rng([seed, 0x10D])
    by_influence = np.argsort(-np.abs(exact), kind="stable")
    if selection == "random":
        return np.sort(rng.choice(n, size=count, replace=False))
    if selection == "influential":
        return np.sort(by_influence[:count])
    top = by_influence[: count // 2]
    rest = np.setdiff1d(np.arange(n), top)
    return np.sort(np.concatenate([top, rng.choice(rest, size=count - top.size, replace=False)]))


@dataclass(frozen=True)
class MethodCorrelation:
    method: str
    n_samples: int
    spearman: float
    pearson: float


@dataclass
class ValidationSummary:
    path: Path
    test_set: str
    samples: np.ndarray
    selection: str
    base_loss: float
    loss_change: np.ndarray
    correlations: list[MethodCorrelation]
    seconds: float

    def lines(self) -> list[str]:
        out = [
            f"leave-one-out retraining of {self.samples.size} training samples "
            f"({self.selection}) through the stored trajectory; base test loss "
            f"{self.base_loss:.6f}, in {self.seconds:.1f} s",
            "correlation of each method's predicted C(i) with the measured change of the test "
            "loss when i is left out:",
            f"{'method':<44} {'samples':>8} {'Spearman':>9} {'Pearson':>8}",
        ]
        for c in self.correlations:
            out.append(f"{c.method:<44} {c.n_samples:>8} {c.spearman:>9.4f} {c.pearson:>8.4f}")
        out.append(f"written to {self.path}/reverse/{self.test_set}/validation")
        return out


@reads_store
def run_validation(
    path: str | Path,
    config: ValidateConfig | str = "test",
    *,
    progress: Progress | None = None,
    methods: MethodRegistry | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> ValidationSummary:
    """Leave-one-out retraining of `samples` training samples (plus one unweighted baseline),
    each an independent dask task; correlate the stored C(i) of every method in `methods`
    (default: the built-in ones) with the measured changes and write them to
    `reverse/<test set>/validation`. `config` is a ValidateConfig, or the test set's name with
    its fields as keyword options. `inputs`: the model, data and loss given in Python
    (`hydra_store.RunInputs`), for a store that does not name them. `out`: a results store to
    read and write the result groups in instead of the recording. `device`: where the
    retrainings run (each task moves its model there and each batch as it is drawn), and the
    reverse sweep when `reverse/<test set>` is not stored yet."""
    config = resolve_config(ValidateConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    require_complete(open_group(path), path)
    results = results_root(path, out)
    stored = read_reverse_group(results, config.test_set)
    if stored is None or "total_contribution_exact" not in stored:
        # What exact_totals would run, on the device asked for.
        reverse = ReverseConfig(test_set=config.test_set, device=config.device)
        run_exact_analysis(path, reverse, progress=progress, inputs=inputs, out=out)
    exact, _, _ = exact_totals(path, config.test_set, progress, inputs, out)
    _context.cache_clear()  # the store may have changed since an earlier call in this process
    chosen = choose_samples(exact, config.samples, config.selection, config.seed)
    jobs = [{}] + [{int(i): 0.0} for i in chosen]
    losses = map_tasks(
        retrained_test_loss,
        [(str(path), config.test_set, job, inputs, config.device) for job in jobs],
        scheduler=config.scheduler,
        progress=progress,
        description="leave-one-out retraining",
    )
    base = float(losses[0])
    change = np.array(losses[1:], dtype=np.float64) - base
    totals = (methods or default_methods()).totals(results, config.test_set)
    correlations, arrays = _correlate(chosen, change, totals)
    name = group_name(config.test_set)
    attrs = {
        "config": asdict(config),
        "selection": config.selection,
        "seed": config.seed,
        "base_test_loss": base,
        "correlations": [c.__dict__ for c in correlations],
    }
    write_result_group(results, f"reverse/{name}/validation", arrays, attrs)
    return ValidationSummary(
        path=results,
        test_set=name,
        samples=chosen,
        selection=config.selection,
        base_loss=base,
        loss_change=change,
        correlations=correlations,
        seconds=time.perf_counter() - started,
    )


def _correlate(
    chosen: np.ndarray, change: np.ndarray, totals: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[list[MethodCorrelation], dict[str, tuple[np.ndarray, tuple[str, ...], dict]]]:
    """Each method's predicted C(i) of the chosen samples, and its correlation with the measured
    changes (methods that cover fewer than two of the samples get no correlation)."""
    correlations = []
    arrays: dict[str, tuple[np.ndarray, tuple[str, ...], dict]] = {
        "validation_sample": (chosen, ("validation_sample",), {}),
        "loss_change": (
            change,
            ("validation_sample",),
            {"long_name": "test loss without the sample minus test loss with it"},
        ),
    }
    for method, (index, values) in totals.items():
        lookup = dict(zip(index.tolist(), values.tolist(), strict=True))
        keep = np.array([int(i) in lookup for i in chosen])
        predicted = np.array([lookup.get(int(i), np.nan) for i in chosen])
        if keep.sum() >= 2:
            correlations.append(
                MethodCorrelation(
                    method,
                    int(keep.sum()),
                    spearman(predicted[keep], change[keep]),
                    pearson(predicted[keep], change[keep]),
                )
            )
        safe = "".join(c if c.isalnum() else "_" for c in method.split(" ")[0])
        arrays[f"predicted_{safe}"] = (predicted, ("validation_sample",), {"method": method})
    return correlations, arrays
