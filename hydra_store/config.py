"""Arguments of the `record` stage, as one dataclass that is validated before anything is written
and saved in the store (root attribute `config`), so that a run can be audited and replayed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_store.errors import InvalidArgumentError
from hydra_store.recorder import MODES
from hydra_store.schedules import ScheduleSpec

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class RecordConfig:
    """Defaults follow the paper's supplement (MNIST row of its Table 3): 20 epochs, batch 64,
    lr 0.01 multiplied by 0.1 at epoch 5, weight decay 2e-5, momentum 0.9."""

    dataset: str = "digits"
    model: str = "mlp"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 2e-5
    schedule: str = "step"
    lr_decay: float | None = None
    lr_step_epochs: int = 5
    plateau_patience: int = 2
    seed: int = 0
    track: str = "all"
    label_noise: float = 0.0
    checkpoint_every: int = 1
    hypergradient_history: bool = False
    out: str = "hydra-run.zarr"
    overwrite: bool = False
    device: str = "cpu"
    mode: str = "approximate"
    data_root: str | None = None
    validation_fraction: float = 0.0

    def schedule_spec(self) -> ScheduleSpec:
        return ScheduleSpec(
            name=self.schedule,
            decay=self.lr_decay,
            step_epochs=self.lr_step_epochs,
            patience=self.plateau_patience,
        )

    def validate(self) -> None:
        """Raise InvalidArgumentError naming the first bad option and what would be valid."""

        def bad(option: str, why: str) -> None:
            raise InvalidArgumentError(f"--{option}: {why}")

        if not 1 <= self.epochs <= 100_000:
            bad("epochs", f"must be between 1 and 100000, got {self.epochs}")
        if not 1 <= self.batch_size <= 1_000_000:
            bad("batch-size", f"must be between 1 and 1000000, got {self.batch_size}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            bad("lr", f"must be in (0, 10], got {self.lr}")
        if not 0 <= self.momentum < 1:
            bad("momentum", f"must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 1):
            bad("weight-decay", f"must be in [0, 1), got {self.weight_decay}")
        if self.lr * self.weight_decay >= 1:
            bad("weight-decay", "lr x weight decay must be below 1 (the paper's condition 5)")
        if not 0 <= self.label_noise < 1:
            bad("label-noise", f"must be a fraction in [0, 1), got {self.label_noise}")
        if self.checkpoint_every < 1:
            bad("checkpoint-every", f"must be >= 1 epoch, got {self.checkpoint_every}")
        if self.device not in DEVICES:
            bad("device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.mode not in MODES:
            bad("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 <= self.validation_fraction < 0.5:
            bad("validation-fraction", f"must be in [0, 0.5), got {self.validation_fraction}")
        if self.hypergradient_history and self.mode == "trajectory":
            bad("hypergradient-history", "a trajectory-only recording has no hypergradients")
        if self.seed < 0:
            bad("seed", f"must be >= 0, got {self.seed}")
        self.schedule_spec().validate()
        track = self.track
        if track != "all" and not track.isdigit() and not Path(track).is_file():
            bad("track", f"must be 'all', a count, or an existing index file; got {track!r}")
        if track.isdigit() and int(track) < 1:
            bad("track", "must track at least one sample")

    def to_attrs(self) -> dict[str, Any]:
        attrs = dataclasses.asdict(self)
        if self.data_root is not None:
            attrs["data_root"] = str(Path(self.data_root).resolve())
        attrs["out"] = str(Path(self.out).resolve())
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> RecordConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in names})
