"""The projector seam: what the tracked hypergradients are a linear image of.

The approximate recurrence is linear in the injected gradients with scalar coefficients, so
tracking `R^T h` with `R^T g` injected gives exactly the projection of the full hypergradient,
for any fixed linear map R. A `Projector` is that map. The recorder projects every per-sample
gradient before it enters the state; the state, the store writer and the analysers take the width
of the tracked vectors from `projector.width` (and the name of its axis from `projector.dim`), not
from the parameter count; an analysis projects its test gradients with the same projector.

Built in: `IdentityProjector` (width = parameter count, axis `param`), `CountSketchProjector`
(axis `projection`; what `record --project-dim K` built before tensor sketches) and
`TensorSketchProjector` (`record --project-dim K`: a CountSketch whose hash is structured per
Linear/Conv2d layer so that a layer's projected per-sample gradients follow from its inputs and
output gradients, core/sketched_gradients.py). How to add another: docs/design.md, "Adding a
projector".
"""

from __future__ import annotations

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


class _HashedProjector(Projector):
    """A CountSketch given by its hash: parameter j is added, times `sign[j]` (+-1), to bucket
    `bucket[j]` of `width`; the subclasses differ in how the hash is drawn."""

    dim = "projection"
    bucket: torch.Tensor
    sign: torch.Tensor

    def _draw_count_sketch(self, n_params: int, width: int, seed: int) -> torch.Generator:
        """Check the sizes, draw an independent bucket and sign per parameter from `seed`, and
        return the generator for further draws."""
        if width < 1:
            raise InvalidArgumentError(f"--project-dim must be at least 1, got {width}")
        if width >= n_params:
            raise InvalidArgumentError(
                f"--project-dim {width} is not smaller than the {n_params} parameters; record "
                "without a projection"
            )
        self.n_params, self.width, self.seed = int(n_params), int(width), int(seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.bucket = torch.randint(0, self.width, (self.n_params,), generator=generator)
        self.sign = torch.randint(0, 2, (self.n_params,), generator=generator).mul_(2).sub_(1)
        return generator

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.shape[-1] != self.n_params:
            raise InvalidArgumentError(
                f"the projector maps {self.n_params} parameters; got vectors of {vectors.shape[-1]}"
            )
        device, dtype = vectors.device, vectors.dtype
        out = torch.zeros(vectors.shape[0], self.width, dtype=dtype, device=device)
        signed = vectors * self.sign.to(device, dtype)
        return out.index_add_(1, self.bucket.to(device), signed)


class CountSketchProjector(_HashedProjector):
    """A seeded sparse random projection (CountSketch): parameter j goes to one of `width`
    buckets, `bucket[j]`, with a random sign `sign[j]`, so `(R^T g)_k = sum_{j: bucket[j] = k}
    sign[j] g_j`.

    E[R R^T] = I, so projected dot products estimate the full ones without bias, and the
    variance of that estimate, (|g|^2 |h|^2 + (g.h)^2 - 2 sum_j g_j^2 h_j^2) / K, is no larger
    than a dense Gaussian projection's. Why this one (docs/scaling.md, "Projection"): it costs
    one pass over each gradient (1.7 ms for 64 LeNet-5 gradients to K = 1,024 on 2 CPU cores)
    and stores 16 bytes per parameter, where a dense Gaussian matrix holds P x K floats (250 MB
    for LeNet-5) and costs P x K multiply-adds per sample, a randomised Hadamard transform costs
    40 ms per batch, and a Kronecker-factored Gaussian per layer (LoGra's structure) ranked the
    samples' total contributions on digits at Spearman 0.70-0.96 against the full ones at K =
    1,024, where this reaches 0.99.
    """

    def __init__(self, n_params: int, width: int, seed: int = 0) -> None:
        self._draw_count_sketch(n_params, width, seed)

    def to_attrs(self) -> dict[str, Any]:
        return {
            "kind": "count-sketch",
            "width": self.width,
            "seed": self.seed,
            "n_params": self.n_params,
        }


@dataclass(frozen=True)
class SketchedLayer:
    """Where a layer's weight, viewed as a (d_out, d_in) matrix stored row-major, starts in
    the flat parameter vector, and its bias (d_out entries) if it has one. A Conv2d weight
    (C_out, C_in, kh, kw) is such a matrix with d_in = C_in kh kw, in `F.unfold`'s order."""

    weight_offset: int
    d_out: int
    d_in: int
    bias_offset: int | None = None

    def to_attrs(self) -> list[int]:
        return [
            self.weight_offset,
            self.d_out,
            self.d_in,
            -1 if self.bias_offset is None else self.bias_offset,
        ]

    @classmethod
    def from_attrs(cls, values: Sequence[int]) -> SketchedLayer:
        weight_offset, d_out, d_in, bias_offset = (int(v) for v in values)
        return cls(weight_offset, d_out, d_in, None if bias_offset < 0 else bias_offset)

    def ranges(self) -> list[tuple[int, int]]:
        """The [start, stop) ranges of the flat vector this layer's parameters occupy."""
        out = [(self.weight_offset, self.weight_offset + self.d_out * self.d_in)]
        if self.bias_offset is not None:
            out.append((self.bias_offset, self.bias_offset + self.d_out))
        return out


@dataclass(frozen=True)
class LayerHash:
    """The two factors of a sketched layer's hash: output row o and input column i (column d_in
    is the bias) of its weight matrix go to bucket `(h_out[o] + h_in[i]) mod width` with sign
    `s_out[o] s_in[i]`."""

    h_out: torch.Tensor
    s_out: torch.Tensor
    h_in: torch.Tensor
    s_in: torch.Tensor


class TensorSketchProjector(_HashedProjector):
    """A CountSketch whose hash is a tensor product on each sketched layer (a TensorSketch):
    entry (o, i) of a layer's weight matrix, and entry o of its bias as column d_in, goes to
    bucket `(h_out[o] + h_in[i]) mod K` with sign `s_out[o] s_in[i]`, where the four factors are
    drawn per layer. Every other parameter has its own independent bucket and sign, as in
    `CountSketchProjector` (with no layers this is that projector, hash for hash).

    It is a CountSketch of the flat vector, so `project` works on any gradient. The structure is
    what the sketched per-sample gradients (core/sketched_gradients.py) need: a layer's gradient
    for one sample is sum_l delta_l a_l^T (output gradient times input, over output positions l),
    and the sketch of an outer product under this hash is the circular convolution of the two
    factors' own CountSketches, one FFT of length K each, without forming the product.

    Projected dot products stay unbiased (E[R R^T] = I: two distinct entries of a layer differ
    in o or in i, and the product of their signs has mean 0); the sign of an entry is a product
    of two signs, so the variance is somewhat above a fully independent CountSketch's
    (measured in docs/scaling.md, "Sketched per-sample gradients").

    The hash depends only on `seed`, `n_params` and `layers`, which `to_attrs` stores, so a store
    rebuilds it without the model.
    """

    def __init__(
        self, n_params: int, width: int, seed: int = 0, layers: Sequence[SketchedLayer] = ()
    ) -> None:
        generator = self._draw_count_sketch(n_params, width, seed)
        self.layers = tuple(sorted(layers, key=lambda layer: layer.weight_offset))
        self._check_layers()
        hashes = []
        for layer in self.layers:
            h_out = torch.randint(0, self.width, (layer.d_out,), generator=generator)
            s_out = torch.randint(0, 2, (layer.d_out,), generator=generator).mul_(2).sub_(1)
            h_in = torch.randint(0, self.width, (layer.d_in + 1,), generator=generator)
            s_in = torch.randint(0, 2, (layer.d_in + 1,), generator=generator).mul_(2).sub_(1)
            bucket = (h_out[:, None] + h_in[None, :]) % self.width
            sign = s_out[:, None] * s_in[None, :]
            start, stop = layer.ranges()[0]
            self.bucket[start:stop] = bucket[:, :-1].reshape(-1)
            self.sign[start:stop] = sign[:, :-1].reshape(-1)
            if layer.bias_offset is not None:
                start, stop = layer.ranges()[1]
                self.bucket[start:stop] = bucket[:, -1]
                self.sign[start:stop] = sign[:, -1]
            hashes.append(LayerHash(h_out, s_out, h_in, s_in))
        self.hashes = tuple(hashes)

    def _check_layers(self) -> None:
        ranges = sorted(r for layer in self.layers for r in layer.ranges())
        for layer in self.layers:
            if layer.d_out < 1 or layer.d_in < 1:
                raise InvalidArgumentError(f"a sketched layer needs positive sizes, got {layer}")
        for k, (start, stop) in enumerate(ranges):
            next_start = ranges[k + 1][0] if k + 1 < len(ranges) else self.n_params
            if start < 0 or stop > next_start:
                raise InvalidArgumentError(
                    f"the sketched layers' parameters must lie apart inside the {self.n_params} "
                    f"parameters; got {list(self.layers)}"
                )

    def to_attrs(self) -> dict[str, Any]:
        return {
            "kind": "tensor-sketch",
            "width": self.width,
            "seed": self.seed,
            "n_params": self.n_params,
            "layers": [layer.to_attrs() for layer in self.layers],
        }


def projector_from_attrs(attrs: Mapping[str, Any] | None, n_params: int) -> Projector:
    """The projector a store was recorded with (stores written before projections existed
    have no `projection` attribute: identity). Every built-in kind rebuilds from the attribute
    alone: a tensor sketch stores its layers' offsets and shapes, so no model is needed."""
    if not attrs or attrs.get("kind") == "identity":
        return IdentityProjector(n_params)
    if attrs.get("kind") == "count-sketch":
        if int(attrs.get("n_params", -1)) != n_params:
            raise StoreFormatError(
                "the store's `projection` attribute does not match its parameter layout"
            )
        return CountSketchProjector(n_params, int(attrs["width"]), int(attrs["seed"]))
    if attrs.get("kind") == "tensor-sketch":
        if int(attrs.get("n_params", -1)) != n_params:
            raise StoreFormatError(
                "the store's `projection` attribute does not match its parameter layout"
            )
        try:
            layers = [SketchedLayer.from_attrs(values) for values in attrs["layers"]]
            return TensorSketchProjector(n_params, int(attrs["width"]), int(attrs["seed"]), layers)
        except (InvalidArgumentError, KeyError, TypeError, ValueError) as error:
            raise StoreFormatError(
                f"the store's `projection` attribute is not a valid tensor sketch: {error}"
            ) from error
    raise StoreFormatError(
        f"this store was recorded with a {attrs.get('kind')!r} projection, which this version "
        "of hydra-store cannot rebuild; analyse it with the version that recorded it"
    )
