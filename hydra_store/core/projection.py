"""The projector seam: what the tracked hypergradients are a linear image of.

The approximate recurrence is linear in the injected gradients with scalar coefficients, so
tracking `R^T h` with `R^T g` injected gives exactly the projection of the full hypergradient,
for any fixed linear map R. A `Projector` is that map. The recorder projects every per-sample
gradient before it enters the state; the state, the store writer and the analysers take the width
of the tracked vectors from `projector.width` (and the name of its axis from `projector.dim`), not
from the parameter count; an analysis projects its test gradients with the same projector.

`IdentityProjector` (width = parameter count, axis `param`) is the one built in today. How to add
another: docs/design.md, "Adding a projector".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from hydra_store.errors import InvalidArgumentError, StoreFormatError


class Projector(ABC):
    """A fixed linear map from the P-dimensional parameter space to `width` dimensions."""

    n_params: int
    width: int
    dim: str  # dimension name of the projected axis in the store

    @abstractmethod
    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, n_params) -> (B, width); the same linear map at every call."""

    @abstractmethod
    def to_attrs(self) -> dict[str, Any]:
        """Everything needed to rebuild this projector, stored as the root attribute
        `projection` (must hold `kind`)."""

    @property
    def is_identity(self) -> bool:
        return False


class IdentityProjector(Projector):
    """No projection: the tracked vectors are the full hypergradients."""

    dim = "param"

    def __init__(self, n_params: int) -> None:
        if n_params < 1:
            raise InvalidArgumentError(f"n_params must be positive, got {n_params}")
        self.n_params = self.width = int(n_params)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors

    def to_attrs(self) -> dict[str, Any]:
        return {"kind": "identity", "width": self.width}

    @property
    def is_identity(self) -> bool:
        return True


def projector_from_attrs(attrs: Mapping[str, Any] | None, n_params: int) -> Projector:
    """The projector a store was recorded with (stores written before projections existed
    have no `projection` attribute: identity)."""
    if not attrs or attrs.get("kind") == "identity":
        return IdentityProjector(n_params)
    raise StoreFormatError(
        f"this store was recorded with a {attrs.get('kind')!r} projection, which this version "
        "of hydra-store cannot rebuild; analyse it with the version that recorded it"
    )
