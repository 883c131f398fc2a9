"""What a model holds besides its trainable parameters, and the randomness of a step.

- **Running statistics** (BatchNorm's `running_mean`, `running_var`, `num_batches_tracked`):
  part of the model's state, updated by every forward pass in training mode. A recording stores
  them with every checkpoint (`BufferLayout` flattens them), and exactly one forward pass per
  step, the one that gives the step's gradients, may update them: every other forward pass of
  the same batch (Hessian-vector products, reverse-mode products) runs under
  `frozen_running_stats`, so replay reproduces the running statistics of training.
- **Batch coupling**: in training mode a BatchNorm layer normalises each sample by statistics of
  its whole batch, so a sample's loss depends on the other samples of the batch; its per-sample
  gradient is then d(batch loss)/d(omega_i) of the weighted batch loss, taken from one forward
  pass of the batch (core/gradients.py `BatchedBackwardGradients`), not from a forward pass of
  the sample alone.
- **Dropout** draws its masks from the random number generator; every forward pass of a step
  runs under `step_randomness(seed)` with the step's seed (stored per step, `step_seed`), so
  replay, reverse mode and leave-one-out retraining see the masks training saw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hydra_store.errors import ReplayMismatchError
from hydra_store.rng import GLOBAL_RNG_LOCK

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, BATCH_NORMS)]


def has_dropout(model: nn.Module) -> bool:
    """Whether a forward pass in training mode draws random dropout masks."""
    return any(isinstance(m, DROPOUTS) and m.p > 0 for m in model.modules())


def needs_batch_forward(model: nn.Module) -> bool:
    """Whether the per-sample gradients of a training step must come from one forward pass of
    the whole batch: BatchNorm couples the samples, and dropout's masks cannot be drawn inside
    a per-sample vmap the way one batch forward draws them."""
    return model.training and (bool(batch_norms(model)) or has_dropout(model))


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes in training mode that use batch statistics but update no running
    statistics (BatchNorm with `track_running_stats` off passes none to `F.batch_norm`)."""
    norms = [m for m in batch_norms(model) if m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def check_mask_device(
    drawn: str | None, device: torch.device | str, source: object, needs: str
) -> None:
    """Dropout masks drawn from one seed differ between CPU and CUDA generators: refuse to
    compute on another kind of device than the one the masks of `source` were `drawn` on (None:
    it drew none), saying who `needs` that device."""
    kind = torch.device(device).type
    if drawn is not None and kind != drawn:
        raise ReplayMismatchError(
            f"the dropout masks of {source} were drawn on {drawn}, and {kind} draws other masks "
            f"from the same seeds: {needs} a {drawn} device"
        )


@contextlib.contextmanager
def step_randomness(seed: int | None, device: torch.device | None = None) -> Iterator[None]:
    """Run under the random number generator seeded with `seed` (None: as it is), leaving the
    caller's generator state as it was: the dropout masks of a step are a function of its
    seed alone. The generator is process-wide, so the block holds its lock (hydra_store.rng):
    dask tasks on threads that retrain or replay a model with dropout take turns here."""
    if seed is None:
        yield
        return
    devices = [device] if device is not None and device.type == "cuda" else []
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def step_seed(run_seed: int, step: int) -> int:
    """The dropout seed of a step (1-based) of a run seeded with `run_seed`."""
    return int(np.random.SeedSequence([int(run_seed), 0xD50, int(step)]).generate_state(1)[0])


@dataclass(frozen=True)
class BufferLayout:
    """The model's buffers (running statistics) as one flat float64 vector: the integer counters
    (`num_batches_tracked`) are exact in float64 up to 2**53."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> BufferLayout:
        named = [(n, b) for n, b in model.named_buffers() if b is not None]
        return cls(
            tuple(n for n, _ in named),
            tuple(tuple(b.shape) for _, b in named),
            tuple(str(b.dtype).removeprefix("torch.") for _, b in named),
        )

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def flatten(self, model: nn.Module) -> np.ndarray:
        named = dict(model.named_buffers())
        parts = [named[n].detach().reshape(-1).to("cpu", torch.float64) for n in self.names]
        return torch.cat(parts).numpy() if parts else np.zeros(0)

    def assign(self, model: nn.Module, values: np.ndarray) -> None:
        """Set the model's buffers from a flat vector of this layout."""
        named = dict(model.named_buffers())
        offset = 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape))
            buffer = named[name]
            block = torch.from_numpy(np.asarray(values[offset : offset + size]).reshape(shape))
            buffer.copy_(block.to(buffer.device, buffer.dtype))
            offset += size

    def to_attrs(self) -> dict[str, list]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "dtypes": list(self.dtypes),
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> BufferLayout:
        return cls(
            tuple(attrs["names"]),
            tuple(tuple(int(n) for n in s) for s in attrs["shapes"]),
            tuple(attrs["dtypes"]),
        )
