"""The flat parameter space: where each parameter tensor of a model sits in the `param` axis."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hydra_store.errors import ModelError


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of a model's trainable parameters, in `named_parameters()` order.

    The `param` axis of every stored array is the concatenation of the flattened tensors in this
    order; `layer_offset[k]:layer_offset[k] + layer_size[k]` is tensor k.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ParameterLayout:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ModelError("the model has no trainable parameters; nothing to track")
        return cls(names=tuple(n for n, _ in named), shapes=tuple(tuple(p.shape) for _, p in named))

    @property
    def sizes(self) -> tuple[int, ...]:
        out = []
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return tuple(out)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for size in self.sizes:
            out.append(acc)
            acc += size
        return tuple(out)

    @property
    def n_params(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate named tensors (parameters, gradients) into one flat vector."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def flatten_batched(
        self, tensors: Mapping[str, torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """Concatenate per-sample tensors of shape (B, *shape) into `out` of shape (B, P)."""
        batch = out.shape[0]
        return torch.cat([tensors[n].reshape(batch, -1) for n in self.names], dim=1, out=out)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat vector shaped as the model's parameters (no copy)."""
        return {
            name: flat[offset : offset + size].view(shape)
            for name, shape, offset, size in zip(
                self.names, self.shapes, self.offsets, self.sizes, strict=True
            )
        }

    def to_attrs(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_attrs(cls, attrs: Mapping) -> ParameterLayout:
        return cls(
            names=tuple(attrs["names"]),
            shapes=tuple(tuple(int(x) for x in s) for s in attrs["shapes"]),
        )


def get_flat_parameters(model: torch.nn.Module, layout: ParameterLayout) -> torch.Tensor:
    """A detached flat copy of the model's current trainable parameters."""
    params = dict(model.named_parameters())
    return torch.cat([params[n].detach().reshape(-1) for n in layout.names])


def set_flat_parameters(
    model: torch.nn.Module, layout: ParameterLayout, flat: torch.Tensor
) -> None:
    """Copy a flat vector into the model's parameters in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, view in layout.unflatten(flat).items():
            params[name].copy_(view)
