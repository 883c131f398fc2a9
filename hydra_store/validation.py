"""Ground truth by retraining: the stored trajectory replayed with per-sample loss weights.

Perturbing sample i by eps_i scales its loss in every batch it is drawn into by (1 + N eps_i)
(that is the `(N / B_t) g_{t,i}` injection of the recurrence), so leave-one-out is the weight 0,
eps_i = -1/N, and the first-order prediction of the test-loss change is exactly C(i) =
-(1/N) u . dw_T/d eps_i. `validate` retrains K samples out, each an independent dask task over
the same batches and learning rates, and correlates each method's C(i) with the measured change.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hydra_store.comparison import exact_totals, pearson, spearman, stored_methods
from hydra_store.data import Split
from hydra_store.errors import InvalidArgumentError
from hydra_store.hypergradient import SGDSettings, per_sample_loss
from hydra_store.parameters import get_flat_parameters, set_flat_parameters
from hydra_store.replay import Trajectory, load_run_data, model_at_checkpoint
from hydra_store.reverse import flush_denormals, write_group_atomically
from hydra_store.store import open_group, require_complete
from hydra_store.testsets import group_name, resolve_test_set

Progress = Callable[[str, int, int], None]
SELECTIONS = ("random", "influential", "mixed")

_BUILD_LOCK = threading.Lock()


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
    if sample_weights is not None:
        weights = torch.as_tensor(np.asarray(sample_weights), dtype=dtype, device=device)
    set_flat_parameters(model, layout, torch.from_numpy(trajectory.weights(0)).to(device, dtype))
    if np.any(trajectory.velocity(0) != 0):
        raise InvalidArgumentError("retraining needs checkpoint 0 at the start of training")
    first = settings[0] if settings else SGDSettings(0.1, 0.0, 0.0)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=first.lr, momentum=first.momentum, weight_decay=first.weight_decay
    )
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    inputs, targets = train.inputs, train.targets
    for batch, s in zip(batches, settings, strict=True):
        for group in optimizer.param_groups:
            group.update(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        index = torch.from_numpy(np.asarray(batch, dtype=np.int64))
        x = inputs[index].to(device, dtype)
        y = targets[index].to(device)
        loss = (weights[index.to(device)] * per_sample_loss(model(x), y)).mean()
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        optimizer.step()
        for p in params:
            p.grad = None
    return get_flat_parameters(model, layout)


def test_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean loss of the model on a test set."""
    param = next(model.parameters())
    total = 0.0
    with torch.no_grad():
        for start in range(0, int(targets.shape[0]), 1024):
            x = inputs[start : start + 1024].to(param.device, param.dtype)
            y = targets[start : start + 1024].to(param.device)
            total += float(per_sample_loss(model(x), y).sum())
    return total / max(1, int(targets.shape[0]))


test_loss.__test__ = False  # not a pytest test


@functools.lru_cache(maxsize=4)
def _context(path: str, test_set: str):
    """What every retraining task of one store needs, loaded once per process."""
    trajectory = Trajectory(path)
    data = load_run_data(path)
    tests = resolve_test_set(path, test_set, run=data)
    batches = trajectory.batches(0, trajectory.n_steps)
    settings = trajectory.settings(0, trajectory.n_steps)
    return trajectory, data.train, tests, batches, settings


def retrained_test_loss(path: str, test_set: str, weights: dict[int, float]) -> float:
    """One task: retrain with the given per-sample loss weights (others 1); the test loss."""
    trajectory, train, tests, batches, settings = _context(path, test_set)
    with _BUILD_LOCK:
        model = model_at_checkpoint(path, 0)
    sample_weights = np.ones(trajectory.n_train)
    for i, w in weights.items():
        sample_weights[i] = w
    with flush_denormals():
        retrain_weighted(
            trajectory, model, train, sample_weights, batches=batches, settings=settings
        )
    return test_loss(model, tests.inputs, tests.targets)


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


def run_validation(
    path: str | Path,
    test_set: str = "test",
    *,
    samples: int = 50,
    selection: str = "random",
    seed: int = 0,
    scheduler: str | None = None,
    progress: Progress | None = None,
) -> ValidationSummary:
    """Leave-one-out retraining of `samples` training samples (plus one unweighted baseline),
    each an independent dask task; correlate every stored method with the measured changes and
    write them to `reverse/<test set>/validation`."""
    from distributed import as_completed

    from hydra_store.scheduler import dask_scheduler

    started = time.perf_counter()
    path = Path(path)
    require_complete(open_group(path), path)
    if selection not in SELECTIONS:
        raise InvalidArgumentError(
            f"--selection must be one of {', '.join(SELECTIONS)}, got {selection!r}"
        )
    exact, approx, _ = exact_totals(path, test_set, progress)
    _context.cache_clear()  # the store may have changed since an earlier call in this process
    chosen = choose_samples(exact, samples, selection, seed)
    jobs: list[dict[int, float]] = [{}] + [{int(i): 0.0} for i in chosen]
    losses: list[float | None] = [None] * len(jobs)
    description = "leave-one-out retraining"
    with dask_scheduler(scheduler) as client:
        if client is None:
            import dask

            lock = threading.Lock()
            finished = [0]

            def task(job: dict[int, float]) -> float:
                loss = retrained_test_loss(str(path), test_set, job)
                with lock:
                    finished[0] += 1
                    if progress is not None:
                        progress(description, finished[0], len(jobs))
                return loss

            losses = list(dask.compute(*[dask.delayed(task, pure=False)(j) for j in jobs]))
        else:
            futures = [
                client.submit(retrained_test_loss, str(path), test_set, job, pure=False)
                for job in jobs
            ]
            order = {f.key: n for n, f in enumerate(futures)}
            for done, future in enumerate(as_completed(futures), start=1):
                losses[order[future.key]] = future.result()
                if progress is not None:
                    progress(description, done, len(jobs))
    base = float(losses[0])
    change = np.array(losses[1:], dtype=np.float64) - base
    methods = {
        "hydra-exact (reverse mode)": (np.arange(exact.size), exact),
        "hydra-approx (reverse mode)": (np.arange(exact.size), approx),
    }
    methods.update(stored_methods(path, test_set))
    correlations = []
    arrays = {
        "validation_sample": (chosen, ("validation_sample",), {}),
        "loss_change": (
            change,
            ("validation_sample",),
            {"long_name": "test loss without the sample minus test loss with it"},
        ),
    }
    for method, (index, values) in methods.items():
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
    name = group_name(test_set)
    attrs = {
        "selection": selection,
        "seed": seed,
        "base_test_loss": base,
        "correlations": [c.__dict__ for c in correlations],
    }
    write_group_atomically(path, f"reverse/{name}/validation", arrays, attrs)
    return ValidationSummary(
        path=path,
        test_set=name,
        samples=chosen,
        selection=selection,
        base_loss=base,
        loss_change=change,
        correlations=correlations,
        seconds=time.perf_counter() - started,
    )
