"""A TRAK-style estimator at the final weights as a contribution method beside HyDRA: `analyze
--method trak`, written to `trak/<test set>`.

    C_TRAK(i) = (1/N) phi_i . (Phi^T Phi / N + damping I)^{-1} phi_u

with ``phi_i = R^T g_i`` the per-sample loss gradients projected by a seeded tensor sketch R of
width K (`--project-dim`, the projector `record --project-dim` uses) and ``phi_u = R^T u`` the
projected mean test gradient: the influence function with the Hessian replaced by the projected
empirical Fisher, in HyDRA's scale and sign (positive: i helps). What it is and is not TRAK:
core/trak.py (one model, no ensemble, loss gradients instead of margin gradients with the Q
reweighting, CountSketch instead of a dense projection, no soft-thresholding).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hydra_store.analysis.baselines import (
    SIGN_CONVENTION,
    extremes_lines,
    load_recorded_run,
    read_total,
    total_arrays,
)
from hydra_store.analysis.methods import ContributionMethod, Totals
from hydra_store.arguments import TrakConfig, resolve_config
from hydra_store.core.gradients import mean_loss_gradient
from hydra_store.core.trak import projected_gradients, trak_projector, trak_scores
from hydra_store.replay.recorded_run import RunInputs
from hydra_store.store.groups import write_result_group
from hydra_store.store.integrity import reads_store
from hydra_store.store.location import store_path
from hydra_store.store.results import results_root

Progress = Callable[[str, int, int], None]

TRAK_GROUP = "trak"


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
    seconds: float
    total: np.ndarray = field(repr=False)

    def lines(self) -> list[str]:
        projection = (
            f"projected to K = {self.width} by a tensor sketch"
            if self.width < self.n_params
            else "not projected"
        )
        return [
            f"TRAK-style scores at the final weights (one model; per-sample gradients of "
            f"{self.n_params} parameters {projection}, damping {self.damping:g}): all "
            f"{self.n_train} training samples against test set {self.test_set!r}, in "
            f"{self.seconds:.1f} s",
            f"written to {self.path}/{self.group}: total_contribution",
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
    """TRAK-style contributions of every training sample to a test set at the final weights,
    written to `trak/<test set>` (of the results store `out` when given). `config` is a
    TrakConfig, or the test set's name with its fields as keyword options."""
    config = resolve_config(TrakConfig, config, options)
    config.validate()
    started = time.perf_counter()
    path = store_path(path)
    run = load_recorded_run(path, config.test_set, inputs)
    results = results_root(path, out)
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
    values = trak_scores(features, direction, config.damping).numpy()
    seconds = time.perf_counter() - started
    attrs = {
        "method": "TRAK-style (one model, projected loss gradients)",
        "config": dataclasses.asdict(config),
        "test_set": config.test_set,
        "n_train": run.n_train,
        "projection": projector.to_attrs(),
        "seconds": seconds,
        "sign_convention": SIGN_CONVENTION,
    }
    name = f"{TRAK_GROUP}/{run.tests.name}"
    long_name = "C(i) TRAK-style: (1/N) phi_i . (Phi^T Phi / N + damping I)^-1 phi_u"
    write_result_group(results, name, total_arrays(run.train, values, long_name), attrs)
    return TrakSummary(
        path=results,
        group=name,
        test_set=run.tests.name,
        n_train=run.n_train,
        n_params=layout.n_params,
        width=projector.width,
        damping=config.damping,
        seconds=seconds,
        total=values,
    )


class TrakMethod(ContributionMethod):
    """A TRAK-style estimator at the final weights (`trak/<test set>`)."""

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

    def totals(self, path: Path, test_set: str) -> Totals:
        found = read_total(path, self.group, test_set)
        if found is None:
            return {}
        index, values, attrs = found
        width = (attrs.get("projection") or {}).get("width", "?")
        damping = (attrs.get("config") or {}).get("damping", float("nan"))
        return {f"trak-style (K={width}, damping {damping:g})": (index, values)}
