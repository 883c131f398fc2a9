"""Analyses of a recorded store (docs/analysis.md, docs/reverse-mode.md).

- lazy dask/xarray functions of the stored hypergradients: `contributions`,
  `total_contributions`, `interclass`, `top_influencers`, `cluster_samples` and
  `sign_clusters` (finding mislabelled samples; no torch);
- the stages behind the CLI: `stored` (`analyze`, `suspects`), `reverse` (reverse mode),
  `comparison` (`compare`), `validation` (`validate`), with `methods` (the contribution-method
  registry), `metrics`, `test_sets` and `figures`.

Nothing here imports the recording layer (an import-linter contract checks it).

The functions return lazy xarray objects backed by dask, so they compose with
`xr.open_zarr(store)` and `xr.open_zarr(store, group="analysis/test")`. `analyze` and `suspects`
(which need torch to compute test gradients) are imported lazily, so that dask workers that
unpickle these graphs never import the model code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hydra_store.analysis.clustering import (
    NoiseScores,
    cluster_samples,
    noise_scores,
    sign_clusters,
)
from hydra_store.analysis.contributions import contributions, total_contributions
from hydra_store.analysis.influencers import extreme_samples, top_influencers
from hydra_store.analysis.interclass import interclass
from hydra_store.arguments import AnalyzeConfig

if TYPE_CHECKING:
    from hydra_store.analysis.stored import AnalyzeSummary, ProgressCallback, SuspectsTable
    from hydra_store.replay.recorded_run import RunInputs

__all__ = [
    "AnalyzeConfig",
    "AnalyzeSummary",
    "NoiseScores",
    "SuspectsTable",
    "analyze",
    "cluster_samples",
    "contributions",
    "extreme_samples",
    "interclass",
    "noise_scores",
    "open_analysis",
    "sign_clusters",
    "suspects",
    "top_influencers",
    "total_contributions",
]


def analyze(
    path: str | Path,
    config: AnalyzeConfig | None = None,
    progress: ProgressCallback | None = None,
    *,
    inputs: RunInputs | None = None,
    out: str | Path | None = None,
) -> AnalyzeSummary:
    """Run every analysis for one test set into `analysis/<name>` (see
    hydra_store.analysis.stored.analyze); `inputs` gives the model and data in Python, `out` a
    results store to write to instead of the recording."""
    from hydra_store.analysis.stored import analyze as run

    return run(path, config, progress, inputs=inputs, out=out)


def suspects(
    path: str | Path, test_set: str = "test", results: str | Path | None = None
) -> SuspectsTable:
    """Training samples ranked from most harmful (see hydra_store.analysis.stored.suspects)."""
    from hydra_store.analysis.stored import suspects as run

    return run(path, test_set, results)


def open_analysis(path: str | Path, test_set: str = "test", results: str | Path | None = None):
    """The analysis group of a test set as a lazy xarray Dataset (from the results store
    `results` when it was written to one)."""
    from hydra_store.analysis.stored import open_analysis as run

    return run(path, test_set, results)


def __getattr__(name: str):
    if name in ("AnalyzeSummary", "SuspectsTable", "ProgressCallback"):
        from hydra_store.analysis import stored

        return getattr(stored, name)
    raise AttributeError(name)
