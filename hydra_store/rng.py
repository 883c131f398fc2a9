"""The lock of torch's process-wide CPU random number generator.

Building a model under a seed (data/models.py) and drawing a step's dropout masks under its
seed (core/model_state.py `step_randomness`) both reseed that one generator and draw from it;
dask runs tasks on threads, so each holds this lock for as long as its draws depend on the seed
it set. It is the package's only lock of its kind.
"""

from __future__ import annotations

import threading

GLOBAL_RNG_LOCK = threading.RLock()
