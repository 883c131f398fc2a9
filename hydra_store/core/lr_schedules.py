"""Learning-rate schedules of the paper's supplement, as torch schedulers.

The recorder reads the learning rate from the optimizer at every step, so these are ordinary
torch.optim.lr_scheduler objects; a user's own scheduler works the same way. The built-in run
(recording/training.py) and the from-scratch retraining of `clean` (analysis/cleaning.py) both
drive their optimizer through `EpochSchedule`, so they follow the same schedule.

The schedule is described by a `hydra_store.arguments.ScheduleSpec`; it is not imported here
(the arguments module reaches dask, which the math core may not), any object with its fields
and methods serves.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ScheduleSpec(Protocol):
    """What `EpochSchedule` reads of a `hydra_store.arguments.ScheduleSpec`."""

    name: str
    step_epochs: int
    patience: int

    def validate(self) -> None: ...

    def resolved_decay(self) -> float: ...


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

    def state_dict(self) -> dict | None:
        """The scheduler's state (a durable point saves it; None for the constant schedule)."""
        return None if self.scheduler is None else self.scheduler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)

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
