"""The one task fan-out: results in the order of the arguments, progress as tasks finish."""

from __future__ import annotations

import pytest

from hydra_store.errors import SchedulerError
from hydra_store.execution import map_tasks


def power(base: int, exponent: int) -> int:
    return base**exponent


def test_map_tasks_on_threads_keeps_order_and_reports_progress():
    calls = []
    results = map_tasks(
        power,
        [(b, 3) for b in range(10)],
        progress=lambda *a: calls.append(a),
        description="cubes",
    )
    assert results == [b**3 for b in range(10)]
    assert sorted(done for _, done, _ in calls) == list(range(1, 11))
    assert {(d, t) for d, _, t in calls} == {("cubes", 10)}


def test_map_tasks_with_no_tasks():
    assert map_tasks(power, [], scheduler="threads") == []


def test_map_tasks_refuses_an_unreachable_scheduler():
    with pytest.raises(SchedulerError, match="no dask scheduler answered"):
        map_tasks(power, [(1, 1)], scheduler="tcp://127.0.0.1:1")


def weighted_sum(weights: list[int], index: int) -> int:
    return weights[index] * index


@pytest.mark.parametrize("scheduler", ["threads", "local-cluster"])
def test_shared_objects_reach_every_task(scheduler):
    weights = [3, 5, 7, 11]
    results = map_tasks(
        weighted_sum, [(i,) for i in range(4)], scheduler=scheduler, shared=(weights,)
    )
    assert results == [0, 5, 14, 33]
