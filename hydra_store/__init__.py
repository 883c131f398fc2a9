"""hydra-store: HyDRA hypergradient data relevance analysis, recorded into Zarr stores."""

from __future__ import annotations

__version__ = "0.1.0"
