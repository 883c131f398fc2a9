"""The learning-rate schedules of the paper's supplement (`core/lr_schedules.py`), which the
built-in run and `clean`'s retraining share."""

from __future__ import annotations

import pytest
import torch

from hydra_store.arguments import ScheduleSpec
from hydra_store.core.lr_schedules import EpochSchedule


def lrs_of(spec: ScheduleSpec, epochs: int, steps: int, losses=None) -> list[float]:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=1.0)
    schedule = EpochSchedule(opt, spec, epochs * steps)
    seen = []
    for epoch in range(epochs):
        for _ in range(steps):
            seen.append(opt.param_groups[0]["lr"])
            schedule.after_step()
        schedule.after_epoch(losses[epoch] if losses else 1.0)
    return seen


def test_schedules_follow_the_papers_supplement():
    assert lrs_of(ScheduleSpec("step", step_epochs=2), 5, 1) == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01]
    )
    assert lrs_of(ScheduleSpec("exponential", decay=0.5), 3, 2) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.25, 0.25]
    )
    # plateau: halve after 2 epochs without improvement of the monitored loss
    got = lrs_of(ScheduleSpec("plateau", patience=2), 6, 1, losses=[5, 4, 4, 4, 4, 4])
    assert got == pytest.approx([1, 1, 1, 1, 1, 0.5])
    cosine = lrs_of(ScheduleSpec("cosine"), 2, 4)
    assert cosine[0] == 1 and cosine[4] == pytest.approx(0.5) and cosine[-1] < 0.05
    assert lrs_of(ScheduleSpec("constant"), 2, 2) == [1, 1, 1, 1]
