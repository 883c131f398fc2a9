"""hydra-store: HyDRA hypergradient data relevance analysis, recorded into Zarr stores.

The public Python API (imported on first use, so that `import hydra_store.analysis` on a dask
worker does not load torch):

- record: `HydraRecorder` (around your own training loop, with `IndexedDataset` to give each
  batch its indices), `RecordConfig` + `record_run`
  (the built-in run behind `hydra-store record`);
- read: `open_dataset` (a store as a lazy xarray Dataset), `model_at_checkpoint`,
  `load_run_data`, `replay_training`, `Trajectory`;
- analyse: `contributions`, `total_contributions`, `interclass`, `top_influencers`,
  `cluster_samples`, `sign_clusters`, `analyze`, `suspects`, `open_analysis`
  (hydra_store.analysis), `run_noise_table` (the paper's Table 4 for every method),
  `run_exact_analysis` (reverse mode), `run_comparison`, `run_validation`, `run_lds` (the
  linear datamodeling score), `run_cleaning` (the paper's Table 3: retraining without the
  samples each method ranks least useful); each analyser that needs the model takes
  `inputs=RunInputs(model=..., train=..., test=..., loss=...)` for a store that does not name
  its data set and model (a user's own loop);
- losses: `PerSampleLoss`, `resolve_loss` (`cross-entropy`, `mse`, or a user's function).

The package is layered (docs/design.md): `data` and `core` at the bottom, then `store`, `replay`,
and `recording` beside `analysis` on top; the CLI lives in the separate `hydra_store_cli`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "HydraRecorder": "hydra_store.recording.recorder",
    "HydraStoreError": "hydra_store.errors",
    "IndexedDataset": "hydra_store.data.indexed",
    "RecordConfig": "hydra_store.arguments",
    "record_run": "hydra_store.recording.training",
    "open_dataset": "hydra_store.store.format",
    "Trajectory": "hydra_store.replay.trajectory",
    "load_run_data": "hydra_store.replay.recorded_run",
    "model_at_checkpoint": "hydra_store.replay.recorded_run",
    "replay_training": "hydra_store.replay.trajectory",
    "contributions": "hydra_store.analysis",
    "total_contributions": "hydra_store.analysis",
    "interclass": "hydra_store.analysis",
    "top_influencers": "hydra_store.analysis",
    "sign_clusters": "hydra_store.analysis",
    "cluster_samples": "hydra_store.analysis",
    "analyze": "hydra_store.analysis",
    "suspects": "hydra_store.analysis",
    "open_analysis": "hydra_store.analysis",
    "run_exact_analysis": "hydra_store.analysis.reverse",
    "run_comparison": "hydra_store.analysis.comparison",
    "run_validation": "hydra_store.analysis.validation",
    "run_lds": "hydra_store.analysis.lds",
    "run_cleaning": "hydra_store.analysis.cleaning",
    "run_noise_table": "hydra_store.analysis.noise_table",
    "RunInputs": "hydra_store.replay.recorded_run",
    "PerSampleLoss": "hydra_store.core.losses",
    "resolve_loss": "hydra_store.core.losses",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hydra_store' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
