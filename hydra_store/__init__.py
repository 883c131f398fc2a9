"""hydra-store: HyDRA hypergradient data relevance analysis, recorded into Zarr stores.

The public Python API:

- record: `HydraRecorder` (around your own training loop), `RecordConfig` + `record_run`
  (the built-in run behind `hydra-store record`);
- read: `open_dataset` (a store as a lazy xarray Dataset), `model_at_checkpoint`,
  `load_run_data`, `replay_training`, `Trajectory`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hydra_store.config import RecordConfig
from hydra_store.errors import HydraStoreError
from hydra_store.recorder import HydraRecorder
from hydra_store.replay import Trajectory, load_run_data, model_at_checkpoint, replay_training
from hydra_store.store import open_dataset
from hydra_store.training import record_run

__all__ = [
    "HydraRecorder",
    "HydraStoreError",
    "RecordConfig",
    "Trajectory",
    "__version__",
    "load_run_data",
    "model_at_checkpoint",
    "open_dataset",
    "record_run",
    "replay_training",
]
