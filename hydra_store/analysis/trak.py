"""A TRAK-style estimator at the weights of a checkpoint (default: the final ones) as a
contribution method beside HyDRA: `analyze --method trak`, written to `trak/<test set>`.

    C_TRAK(i) = (1/N) phi_i . (Phi^T Phi / N + damping I)^{-1} phi_u

with ``phi_i = R^T g_i`` the per-sample loss gradients projected by a seeded tensor sketch R of
width K (`--project-dim`, the projector `record --project-dim` uses) and ``phi_u = R^T u`` the
projected mean test gradient: the influence function with the Hessian replaced by the projected
empirical Fisher, in HyDRA's scale and sign (positive: i helps). What it is and is not TRAK:
core/trak.py (one model, no ensemble, loss gradients instead of margin gradients with the Q
reweighting, CountSketch instead of a dense projection, no soft-thresholding). Per test sample
j (`per_test`), phi_u is replaced by ``phi_j = R^T g_j``; their mean over all test samples is
phi_u, so the mean of C(i, j) is C(i). Everything runs on the config's `device` (None: the CPU):
the projected gradients (N, K) float64 and the K x K solve stay there until the scores are
read back.
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
)
from hydra_store.arguments import TrakConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.core.projection import Projector
from hydra_store.core.trak import projected_gradients, trak_projector, trak_scores
from hydra_store.replay.recorded_run import RunInputs
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

TRAK_GROUP = "trak"


@dataclass
class TrakResult:
    """C_TRAK of every training sample at one checkpoint: the total, per test sample when
    asked (None otherwise), and the projector used."""

    total: np.ndarray
    per_test: np.ndarray | None
    projector: Projector


def trak_contributions(
    run: RecordedRun,
    config: TrakConfig,
    chosen: np.ndarray,
    progress: Progress | None = None,
) -> TrakResult:
    """C_TRAK(i) = (1/N) phi_i . (Phi^T Phi / N + damping I)^{-1} phi_u at the run's checkpoint,
    and for each chosen test sample j the same with phi_j = R^T g_j in place of phi_u."""
    model, layout, loss = run.model, run.layout, run.loss
    projector = trak_projector(model, config.project_dim, config.seed)
    features = projected_gradients(
        model,
        layout,
        run.train.inputs,
        run.train.targets,
        projector,
        loss=loss,
        batch_size=config.batch_size,
        progress=progress,
    )
    u, _ = mean_loss_gradient(model, layout, run.tests.inputs, run.tests.targets, loss=loss)
    direction = projector.project(u[None])[0]
    total = trak_scores(features, direction, config.damping).cpu().numpy()
    per_test = None
    if chosen.size:
        gradients = per_test_gradients(run, chosen, config.batch_size)
        scores = trak_scores(features, projector.project(gradients), config.damping)
        per_test = scores.cpu().numpy()
    return TrakResult(total, per_test, projector)


@dataclass
class TrakSummary:
    """What `run_trak` computed and where it wrote it."""

    path: Path
    group: str
    test_set: str
    n_train: int
    n_params: int
    width: int
    damping: float
    checkpoint: int
    step: int
    seconds: float
    total: np.ndarray = field(repr=False)
    per_test: np.ndarray | None = field(default=None, repr=False)
    test: np.ndarray | None = field(default=None, repr=False)

    def lines(self) -> list[str]:
        projection = (
            f"projected to K = {self.width} by a tensor sketch"
            if self.width < self.n_params
            else "not projected"
        )
        written = TOTAL + (
            f", {PER_TEST} for {self.test.size} test samples" if self.test is not None else ""
        )
        return [
            f"TRAK-style scores at checkpoint {self.checkpoint} (step {self.step}; one model; "
            f"per-sample gradients of {self.n_params} parameters {projection}, damping "
            f"{self.damping:g}): all {self.n_train} training samples against test set "
            f"{self.test_set!r}, in {self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: {written}",
            *extremes_lines(self.total),
        ]


@reads_store
def run_trak(
    path: str | Path,
    config: TrakConfig | str = "test",
    *,
    progress: Progress | None = None,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> TrakSummary:
    """TRAK-style contributions of every training sample to a test set at the weights of a
    checkpoint (`checkpoint`, default the last), and with `per_test` for each chosen test
    sample, written to `trak/<test set>` (of the results store `out` when given). `config` is
    a TrakConfig, or the test set's name with its fields as keyword options."""
    if isinstance(options.get("per_test"), Sequence):
        options["per_test"] = tuple(int(i) for i in options["per_test"])
    config = resolve_config(TrakConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    run = load_recorded_run(
        path, config.test_set, inputs, checkpoint=config.checkpoint, device=config.device
    )
    chosen = chosen_test_samples(config.per_test, run.tests)
    results = results_root(path, out)
    found = trak_contributions(run, config, chosen, progress)
    seconds = time.perf_counter() - started
    attrs = {
        "method": "TRAK-style (one model, projected loss gradients)",
        "config": config_attrs(config),
        "test_set": config.test_set,
        **checkpoint_attrs(run),
        "n_train": run.n_train,
        "projection": found.projector.to_attrs(),
        "seconds": seconds,
        "sign_convention": SIGN_CONVENTION,
    }
    name = f"{TRAK_GROUP}/{run.tests.name}"
    long_name = "C(i) TRAK-style: (1/N) phi_i . (Phi^T Phi / N + damping I)^-1 phi_u"
    arrays = total_arrays(run.train, found.total, long_name)
    arrays |= per_test_arrays(
        run.tests,
        chosen,
        found.per_test,
        "C(i, j) TRAK-style: (1/N) phi_i . (Phi^T Phi / N + damping I)^-1 phi_j",
    )
    write_result_group(results, name, arrays, attrs)
    return TrakSummary(
        path=results,
        group=name,
        test_set=run.tests.name,
        n_train=run.n_train,
        n_params=run.layout.n_params,
        width=found.projector.width,
        damping=config.damping,
        checkpoint=run.checkpoint,
        step=run.step,
        seconds=seconds,
        total=found.total,
        per_test=found.per_test,
        test=chosen if chosen.size else None,
    )


class TrakMethod(BaselineMethod):
    """A TRAK-style estimator at the weights of a checkpoint (`trak/<test set>`)."""

    name = "trak"
    group = TRAK_GROUP
    config_type = TrakConfig
    description = "TRAK-style scores from projected per-sample gradients (one model)"

    def run(
        self,
        path: Path,
        config: TrakConfig,
        progress: Progress | None = None,
        inputs: Any = None,
        out: Any = None,
    ) -> TrakSummary:
        return run_trak(path, config, progress=progress, inputs=inputs, out=out)

    def label(self, attrs: dict[str, Any]) -> str:
        width = (attrs.get("projection") or {}).get("width", "?")
        damping = (attrs.get("config") or {}).get("damping", float("nan"))
        return f"trak-style (K={width}, damping {damping:g})"

    def totals_at(
        self,
        path: Path,
        checkpoints: Sequence[int],
        config: TrakConfig,
        *,
        inputs: Any = None,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """C_TRAK(i) at the weights of each checkpoint (the same projector at each), as
        `run_trak` computes them; nothing written."""
        config.validate()
        run = load_recorded_run(path, config.test_set, inputs, device=config.device)
        out = np.zeros((len(checkpoints), run.n_train))
        for row, k in enumerate(checkpoints):
            out[row] = trak_contributions(run.at(k), config, np.zeros(0, dtype=np.int64)).total
            if progress is not None:
                progress("TRAK-style over checkpoints", row + 1, len(checkpoints))
        return out

    def config_label(self, config: TrakConfig) -> str:
        return f"trak-style (K={config.project_dim}, damping {config.damping:g})"
