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
Cost per checkpoint: one test gradient and one forward-mode pass over the training set, on the
config's `device` (None: the CPU; each checkpoint's model is built there).

`checkpoint` K sums over checkpoints 1..K only (the contribution to the model at K). Per test
sample j (`per_test`), u(w_k) is replaced by the test sample's own loss gradient g_j(w_k):
``C(i, j) = (1/N) sum_k L_k g_i(w_k) . g_j(w_k)``, whose mean over all test samples is C(i).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
from hydra_store.analysis.reverse import resolve_checkpoint
from hydra_store.arguments import TracInConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.replay.recorded_run import RunInputs
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

TRACIN_GROUP = "tracin"


@dataclass(frozen=True)
class TracInTerms:
    """Each checkpoint's term of C_TracIn: (K, N) for checkpoints 1..K, with their steps and
    learning-rate sums L_k; and, for chosen test samples, the per-test sum (N, T) (None when
    none was chosen)."""

    terms: np.ndarray
    checkpoint: np.ndarray
    step: np.ndarray
    lr_sum: np.ndarray
    per_test: np.ndarray | None = None

    @property
    def total(self) -> np.ndarray:
        return self.terms.sum(axis=0)


def tracin_terms(
    run: RecordedRun,
    *,
    last: int | None = None,
    chosen: np.ndarray | None = None,
    batch_size: int = 1024,
    progress: Progress | None = None,
) -> TracInTerms:
    """``(L_k / N) g_i(w_k) . u(w_k)`` for every stored checkpoint k in 1..`last` (None: the
    last) and every training sample i; with `chosen` test samples, also the per-test sum
    ``(1/N) sum_k L_k g_i(w_k) . g_j(w_k)``. The models come from `run.at(k)` (with whatever
    else the store keeps at a checkpoint, e.g. buffers: `model_at_checkpoint`)."""
    trajectory, n = run.trajectory, run.n_train
    lr = np.asarray(trajectory.group["lr"][:], dtype=np.float64)
    steps = trajectory.checkpoint_step
    end = resolve_checkpoint(len(steps), last)
    chosen = np.zeros(0, dtype=np.int64) if chosen is None else chosen
    picked = list(range(1, end + 1))
    terms = np.zeros((len(picked), n), dtype=np.float64)
    per_test = np.zeros((n, chosen.size), dtype=np.float64) if chosen.size else None
    sums = np.zeros(len(picked), dtype=np.float64)
    for row, k in enumerate(picked):
        sums[row] = lr[int(steps[k - 1]) : int(steps[k])].sum()
        at = run.at(k)
        u, _ = mean_loss_gradient(
            at.model,
            at.layout,
            at.tests.inputs,
            at.tests.targets,
            batch_size=batch_size,
            loss=at.loss,
        )
        dots = training_dots(at, u[None], batch_size)[:, 0]
        terms[row] = dots.double().cpu().numpy() * (sums[row] / n)
        if per_test is not None:
            directions = per_test_gradients(at, chosen, batch_size)
            block = training_dots(at, directions, batch_size)
            per_test += block.double().cpu().numpy() * (sums[row] / n)
        if progress is not None:
            progress("TracIn checkpoints", row + 1, len(picked))
    return TracInTerms(
        terms=terms,
        checkpoint=np.asarray(picked, dtype=np.int64),
        step=np.asarray([int(steps[k]) for k in picked], dtype=np.int64),
        lr_sum=sums,
        per_test=per_test,
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
    per_test: np.ndarray | None = field(default=None, repr=False)
    test: np.ndarray | None = field(default=None, repr=False)

    def lines(self) -> list[str]:
        written = f"{TOTAL}, checkpoint_contribution" + (
            f", {PER_TEST} for {self.test.size} test samples" if self.test is not None else ""
        )
        return [
            f"TracIn over {self.n_checkpoints} checkpoints (each weighted by the sum of its "
            f"segment's learning rates): all {self.n_train} training samples against test set "
            f"{self.test_set!r}, in {self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: {written}",
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
    checkpoints 1..`checkpoint` (default: all), and with `per_test` for each chosen test
    sample, written to `tracin/<test set>` (of the results store `out` when given).
    `config` is a TracInConfig, or the test set's name with its fields as keyword options."""
    if isinstance(options.get("per_test"), Sequence):
        options["per_test"] = tuple(int(i) for i in options["per_test"])
    config = resolve_config(TracInConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    run = load_recorded_run(
        path, config.test_set, inputs, checkpoint=config.checkpoint, device=config.device
    )
    chosen = chosen_test_samples(config.per_test, run.tests)
    results = results_root(path, out)
    found = tracin_terms(
        run,
        last=run.checkpoint,
        chosen=chosen,
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
    arrays |= per_test_arrays(
        run.tests,
        chosen,
        found.per_test,
        "C(i, j) by TracIn: (1/N) sum_k L_k g_i(w_k) . g_j(w_k)",
    )
    seconds = time.perf_counter() - started
    attrs = {
        "method": "TracIn (TracInCP over the stored checkpoints)",
        "config": config_attrs(config),
        "test_set": config.test_set,
        **checkpoint_attrs(run),
        "n_train": run.n_train,
        "n_checkpoints_summed": int(found.checkpoint.size),
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
        per_test=found.per_test,
        test=chosen if chosen.size else None,
    )


class TracInMethod(BaselineMethod):
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

    def label(self, attrs: dict[str, Any]) -> str:
        count = attrs.get("n_checkpoints_summed", attrs.get("n_checkpoints", "?"))
        return f"tracin ({count} checkpoints)"

    def totals_at(
        self,
        path: Path,
        checkpoints: Sequence[int],
        config: TracInConfig,
        *,
        inputs: Any = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """C_TracIn(i) summed over checkpoints 1..k for each k: the running sum of one pass
        over the checkpoints up to the largest k."""
        config.validate()
        run = load_recorded_run(path, config.test_set, inputs, device=config.device)
        wanted = [resolve_checkpoint(run.n_checkpoints, k) for k in checkpoints]
        found = tracin_terms(
            run, last=max(wanted, default=0), batch_size=config.batch_size, progress=progress
        )
        running = np.vstack([np.zeros((1, run.n_train)), np.cumsum(found.terms, axis=0)])
        return running[wanted]
