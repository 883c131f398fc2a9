"""The math core: parameters, the SGD step, per-sample gradients, the tracked state and the
hypergradient recurrences. Pure torch and numpy (numba for the CPU kernel); no storage, no dask,
nothing that writes files (an import-linter contract in pyproject.toml checks this)."""
