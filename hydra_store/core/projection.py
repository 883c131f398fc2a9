"""The projector seam: what the tracked hypergradients are a linear image of.

The approximate recurrence is linear in the injected gradients with scalar coefficients, so
tracking `R^T h` with `R^T g` injected gives exactly the projection of the full hypergradient,
for any fixed linear map R. A `Projector` is that map. The recorder projects every per-sample
gradient before it enters the state; the state, the store writer and the analysers take the width
of the tracked vectors from `projector.width` (and the name of its axis from `projector.dim`), not
from the parameter count; an analysis projects its test gradients with the same projector.

Built in: `IdentityProjector` (width = parameter count, axis `param`) and
`KroneckerProjector` (`record --project-dim K`, axis `projection`). How to add another:
docs/design.md, "Adding a projector".
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class KroneckerBlock:
    """How one parameter tensor, seen as an (rows, cols) matrix G, is projected: to
    `R_rows^T G R_cols` of shape (k_rows, k_cols), or copied whole when `identity`."""

    offset: int
    rows: int
    cols: int
    k_rows: int
    k_cols: int
    identity: bool

    @property
    def width(self) -> int:
        return self.rows * self.cols if self.identity else self.k_rows * self.k_cols

    def to_list(self) -> list:
        return [self.offset, self.rows, self.cols, self.k_rows, self.k_cols, self.identity]


class KroneckerProjector(Projector):
    """A seeded random projection with one Kronecker-factored Gaussian block per parameter
    tensor: R = blockdiag_l (A_l ⊗ B_l), with A_l (rows_l x k_rows_l) and B_l (cols_l x
    k_cols_l) of N(0, 1/k) entries, so E[R R^T] = I and projected dot products estimate the
    full ones without bias.

    Why this structure: the dense (P x K) Gaussian matrix is P*K floats (250 MB for LeNet-5 at
    K = 1,024) and P*K multiply-adds per sample; a randomised Hadamard transform needs no matrix
    but costs 40 ms per batch of 64 at P = 61,706 on 2 CPU cores, more than the per-sample
    gradients themselves. The Kronecker factors are a few kilobytes per tensor and cost
    B*(rows*cols*k_cols + rows*k_cols*k_rows) per batch; and a layer's per-sample gradient is
    an outer product of its input and output gradient, which the factors can project without
    forming it (the structure LoGra uses). A tensor whose share of K is at least its size is
    copied whole (exact).

    The target width K is shared out in proportion to the tensors' sizes (which minimises the
    variance of the estimate when entries are of one magnitude; at least one dimension each,
    at most the tensor's size), and each share factored as k_rows x k_cols; `width` is the sum, at most
    K and usually within a few percent of it.
    """

    dim = "projection"

    def __init__(self, shapes: Sequence[Sequence[int]], target_width: int, seed: int = 0) -> None:
        sizes = [math.prod(shape) for shape in shapes]
        if target_width < 1:
            raise InvalidArgumentError(f"--project-dim must be at least 1, got {target_width}")
        if target_width < len(sizes):
            raise InvalidArgumentError(
                f"--project-dim {target_width} is smaller than the model's {len(sizes)} "
                "parameter tensors; give each at least one dimension"
            )
        self.n_params = sum(sizes)
        if target_width >= self.n_params:
            raise InvalidArgumentError(
                f"--project-dim {target_width} is not smaller than the {self.n_params} "
                "parameters; record without a projection"
            )
        self.shapes = [tuple(int(x) for x in shape) for shape in shapes]
        self.target_width = int(target_width)
        self.seed = int(seed)
        self.blocks = _kronecker_blocks(self.shapes, self.target_width)
        self.width = sum(b.width for b in self.blocks)
        self._factors = [self._draw(k, b) for k, b in enumerate(self.blocks)]

    def _draw(self, k: int, block: KroneckerBlock) -> tuple[torch.Tensor, torch.Tensor] | None:
        if block.identity:
            return None
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        left = torch.randn(block.rows, block.k_rows, generator=generator, dtype=torch.float64)
        right = torch.randn(block.cols, block.k_cols, generator=generator, dtype=torch.float64)
        return left / math.sqrt(block.k_rows), right / math.sqrt(block.k_cols)

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.n_params:
            raise InvalidArgumentError(
                f"the projector maps {self.n_params} parameters; got vectors of {vectors.shape[-1]}"
            )
        batch = vectors.shape[0]
        out = torch.empty(batch, self.width, dtype=vectors.dtype, device=vectors.device)
        position = 0
        for block, factors in zip(self.blocks, self._factors, strict=True):
            piece = vectors[:, block.offset : block.offset + block.rows * block.cols]
            if factors is None:
                out[:, position : position + block.width] = piece
            else:
                left, right = (f.to(vectors.device, vectors.dtype) for f in factors)
                matrix = piece.reshape(batch, block.rows, block.cols)
                projected = torch.matmul(left.T, torch.matmul(matrix, right))
                out[:, position : position + block.width] = projected.reshape(batch, -1)
            position += block.width
        return out

    def to_attrs(self) -> dict[str, Any]:
        return {
            "kind": "kronecker",
            "width": self.width,
            "target_width": self.target_width,
            "seed": self.seed,
            "shapes": [list(s) for s in self.shapes],
            "blocks": [b.to_list() for b in self.blocks],
        }


def _kronecker_blocks(shapes: list[tuple[int, ...]], target: int) -> list[KroneckerBlock]:
    """Share `target` dimensions out over the tensors and factor each share."""
    sizes = [math.prod(s) for s in shapes]
    share = [0] * len(shapes)
    remaining, remaining_size = target, sum(sizes)
    for k in sorted(range(len(shapes)), key=lambda k: sizes[k]):
        share[k] = min(sizes[k], max(1, remaining * sizes[k] // remaining_size))
        remaining -= share[k]
        remaining_size -= sizes[k]
    blocks, offset = [], 0
    for shape, size, s in zip(shapes, sizes, share, strict=True):
        rows = shape[0] if len(shape) > 1 else size
        cols = size // rows
        if s >= size:
            blocks.append(KroneckerBlock(offset, rows, cols, rows, cols, True))
        else:
            k_rows = max(1, min(rows, round(math.sqrt(s * rows / cols))))
            k_cols = max(1, min(cols, s // k_rows))
            k_rows = max(1, min(rows, s // k_cols))
            blocks.append(KroneckerBlock(offset, rows, cols, k_rows, k_cols, False))
        offset += size
    return blocks


def projector_from_attrs(attrs: Mapping[str, Any] | None, n_params: int) -> Projector:
    """The projector a store was recorded with (stores written before projections existed
    have no `projection` attribute: identity)."""
    if not attrs or attrs.get("kind") == "identity":
        return IdentityProjector(n_params)
    if attrs.get("kind") == "kronecker":
        projector = KroneckerProjector(attrs["shapes"], int(attrs["target_width"]), attrs["seed"])
        if projector.n_params != n_params or projector.width != attrs.get("width"):
            raise StoreFormatError(
                "the store's `projection` attribute does not match its parameter layout"
            )
        return projector
    raise StoreFormatError(
        f"this store was recorded with a {attrs.get('kind')!r} projection, which this version "
        "of hydra-store cannot rebuild; analyse it with the version that recorded it"
    )
