"""Learning-rate schedules of the paper's supplement, as torch schedulers.

The recorder reads the learning rate from the optimizer at every step, so these are ordinary
torch.optim.lr_scheduler objects; a user's own scheduler works the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hydra_store.errors import InvalidArgumentError

SCHEDULES = ("constant", "step", "exponential", "plateau", "cosine")


@dataclass(frozen=True)
class ScheduleSpec:
    """`step`: multiply by `decay` every `step_epochs` epochs (paper, MNIST: 0.1 at epoch 5).
    `exponential`: multiply by `decay` every epoch. `plateau`: multiply by `decay` when the
    monitored loss has not improved by more than 0.01% of its best value for `patience` epochs
    (paper, Fashion-MNIST: 0.5, 2 epochs). `cosine`: cosine annealing to 0, stepped every step.
    """

    name: str = "step"
    decay: float | None = None
    step_epochs: int = 5
    patience: int = 2

    def resolved_decay(self) -> float:
        if self.decay is not None:
            return self.decay
        return {"step": 0.1, "exponential": 0.95, "plateau": 0.5}.get(self.name, 1.0)

    def validate(self) -> None:
        if self.name not in SCHEDULES:
            raise InvalidArgumentError(
                f"unknown schedule {self.name!r}; choose one of {', '.join(SCHEDULES)}"
            )
        decay = self.resolved_decay()
        if not 0 < decay <= 1:
            raise InvalidArgumentError(f"--lr-decay must be in (0, 1], got {decay}")
        if self.step_epochs < 1:
            raise InvalidArgumentError(f"--lr-step-epochs must be >= 1, got {self.step_epochs}")
        if self.patience < 0:
            raise InvalidArgumentError(f"--plateau-patience must be >= 0, got {self.patience}")


class EpochSchedule:
    """Drives one torch scheduler: `after_step()` every step, `after_epoch(loss)` every epoch."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int
    ) -> None:
        spec.validate()
        self.spec = spec
        decay = spec.resolved_decay()
        sched = torch.optim.lr_scheduler
        self.per_step = spec.name == "cosine"
        if spec.name == "constant":
            self.scheduler = None
        elif spec.name == "step":
            self.scheduler = sched.StepLR(optimizer, step_size=spec.step_epochs, gamma=decay)
        elif spec.name == "exponential":
            self.scheduler = sched.ExponentialLR(optimizer, gamma=decay)
        elif spec.name == "plateau":
            self.scheduler = sched.ReduceLROnPlateau(
                optimizer,
                mode="min",
                factor=decay,
                patience=spec.patience,
                threshold=1e-4,
                threshold_mode="rel",
            )
        else:
            self.scheduler = sched.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, monitored_loss: float) -> None:
        if self.scheduler is None or self.per_step:
            return
        if self.spec.name == "plateau":
            self.scheduler.step(monitored_loss)
        else:
            self.scheduler.step()
