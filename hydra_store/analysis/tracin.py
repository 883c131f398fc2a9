"""TracIn over the stored checkpoints (TracInCP, Pruthi et al., 2020) as a contribution method
beside HyDRA: `analyze --method tracin`, written to `tracin/<test set>`.

HyDRA's recurrence without the Hessian and without momentum injects, at every step t that draws
sample i, ``-(eta_t N / B_t) g_{t,i}`` into h; a sample is drawn about once per N / B_t steps,
so between two checkpoints it receives about ``-(sum_t eta_t) g_i`` on average. TracIn takes that
gradient at the checkpoint w_k ending the segment, and the test gradient there too:

    C_TracIn(i) = (1/N) sum_k  L_k  g_i(w_k) . u(w_k),   L_k = sum of the learning rates of the
                                                          steps from checkpoint k-1 to k

(``L_k`` = the segment's mean learning rate times its number of steps), which is ``-(1/N) u .
h`` with ``h ~ -sum_k L_k g_i(w_k)`` and u taken at each checkpoint: HyDRA's scale and sign
(positive: i helps). TracIn as published uses the checkpoints' learning rates and ignores
momentum; so does this (with momentum p its magnitudes are about (1 - p) times HyDRA's, which
changes no rank and no sign). Each checkpoint's term is stored too (`checkpoint_contribution`).
Cost per checkpoint: one test gradient and one forward-mode pass over the training set.
"""

from __future__ import annotations

import dataclasses
import time
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
from hydra_store.analysis.test_sets import TestSet
from hydra_store.arguments import TracInConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient, per_sample_directional_derivatives
from hydra_store.data.datasets import Split
from hydra_store.replay.recorded_run import RunInputs, model_at_checkpoint
from hydra_store.replay.trajectory import Trajectory
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

TRACIN_GROUP = "tracin"


@dataclass(frozen=True)
class TracInTerms:
    """Each checkpoint's term of C_TracIn: (K, N) for checkpoints 1..K, with their steps and
    learning-rate sums L_k."""

    terms: np.ndarray
    checkpoint: np.ndarray
    step: np.ndarray
    lr_sum: np.ndarray

    @property
    def total(self) -> np.ndarray:
        return self.terms.sum(axis=0)


def tracin_terms(
    trajectory: Trajectory,
    model_at: Callable[[int], torch.nn.Module],
    train: Split,
    tests: TestSet,
    *,
    batch_size: int = 1024,
    progress: Progress | None = None,
) -> TracInTerms:
    """``(L_k / N) g_i(w_k) . u(w_k)`` for every stored checkpoint k >= 1 and every training
    sample i; `model_at(k)` gives the model at checkpoint k (with whatever else the store keeps
    there, e.g. buffers: `model_at_checkpoint`)."""
    layout, loss, n = trajectory.layout, trajectory.loss, trajectory.n_train
    lr = np.asarray(trajectory.group["lr"][:], dtype=np.float64)
    steps = trajectory.checkpoint_step
    chosen = list(range(1, len(steps)))
    terms = np.zeros((len(chosen), n), dtype=np.float64)
    sums = np.zeros(len(chosen), dtype=np.float64)
    for row, k in enumerate(chosen):
        sums[row] = lr[int(steps[k - 1]) : int(steps[k])].sum()
        model = model_at(k)
        u, _ = mean_loss_gradient(
            model, layout, tests.inputs, tests.targets, batch_size=batch_size, loss=loss
        )
        dots = per_sample_directional_derivatives(
            model, layout, train.inputs, train.targets, u, batch_size=batch_size, loss=loss
        )
        terms[row] = dots.double().cpu().numpy() * (sums[row] / n)
        if progress is not None:
            progress("TracIn checkpoints", row + 1, len(chosen))
    return TracInTerms(
        terms=terms,
        checkpoint=np.asarray(chosen, dtype=np.int64),
        step=np.asarray([int(steps[k]) for k in chosen], dtype=np.int64),
        lr_sum=sums,
    )


@dataclass
class TracInSummary:
    """What `run_tracin` computed and where it wrote it."""

    path: Path
    group: str
    test_set: str
    n_train: int
    n_checkpoints: int
    seconds: float
    total: np.ndarray = field(repr=False)

    def lines(self) -> list[str]:
        return [
            f"TracIn over {self.n_checkpoints} checkpoints (each weighted by the sum of its "
            f"segment's learning rates): all {self.n_train} training samples against test set "
            f"{self.test_set!r}, in {self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: total_contribution, checkpoint_contribution",
            *extremes_lines(self.total),
        ]


@reads_store
def run_tracin(
    path: str | Path,
    config: TracInConfig | str = "test",
    *,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> TracInSummary:
    """TracIn contributions of every training sample to a test set over the stored
    checkpoints, written to `tracin/<test set>` (of the results store `out` when given).
    `config` is a TracInConfig, or the test set's name with its fields as keyword options."""
    config = resolve_config(TracInConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    run = load_recorded_run(path, config.test_set, inputs)
    results = results_root(path, out)
    found = tracin_terms(
        run.trajectory,
        lambda k: model_at_checkpoint(path, k, inputs=inputs),
        run.train,
        run.tests,
        batch_size=config.batch_size,
        progress=progress,
    )
    total = found.total
    arrays = total_arrays(
        run.train, total, "C(i) by TracIn: (1/N) sum_k L_k g_i(w_k) . u(w_k) over checkpoints"
    )
    arrays |= {
        "checkpoint": (found.checkpoint, ("checkpoint",), {}),
        "checkpoint_step": (found.step, ("checkpoint",), {}),
        "lr_sum": (
            found.lr_sum,
            ("checkpoint",),
            {"long_name": "L_k: sum of the learning rates of the segment ending at checkpoint k"},
        ),
        "checkpoint_contribution": (
            found.terms,
            ("checkpoint", "train"),
            {"long_name": "checkpoint k's term (L_k / N) g_i(w_k) . u(w_k)"},
        ),
    }
    seconds = time.perf_counter() - started
    attrs = {
        "method": "TracIn (TracInCP over the stored checkpoints)",
        "config": dataclasses.asdict(config),
        "test_set": config.test_set,
        "n_train": run.n_train,
        "n_checkpoints": int(found.checkpoint.size),
        "seconds": seconds,
        "sign_convention": SIGN_CONVENTION,
    }
    name = f"{TRACIN_GROUP}/{run.tests.name}"
    write_result_group(results, name, arrays, attrs)
    return TracInSummary(
        path=results,
        group=name,
        test_set=run.tests.name,
        n_train=run.n_train,
        n_checkpoints=int(found.checkpoint.size),
        seconds=seconds,
        total=total,
    )


class TracInMethod(ContributionMethod):
    """TracIn over the stored checkpoints (`tracin/<test set>`)."""

    name = "tracin"
    group = TRACIN_GROUP
    config_type = TracInConfig
    description = "TracIn over the stored checkpoints (learning-rate weighted)"

    def run(
        self,
        path: Path,
        config: TracInConfig,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> TracInSummary:
        return run_tracin(path, config, progress=progress, inputs=inputs, out=out)

    def totals(self, path: Path, test_set: str) -> Totals:
        found = read_total(path, self.group, test_set)
        if found is None:
            return {}
        index, values, attrs = found
        return {f"tracin ({attrs.get('n_checkpoints', '?')} checkpoints)": (index, values)}
