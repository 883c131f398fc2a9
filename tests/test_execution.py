"""The one task fan-out: results in the order of the arguments, progress as tasks finish."""

from __future__ import annotations

import functools
import os

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


def weighted_sum_dying_once(marker: str, weights: list[int], index: int) -> int:
    """The first call anywhere ends its worker process (a marker file makes it once)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return weights[index] * index
    os._exit(1)


def test_tasks_whose_shared_data_died_with_a_worker_are_run_again(tmp_path, monkeypatch):
    """The shared objects scattered to one worker only (as dask's memory manager may leave a
    broadcast), and that worker killed by the first task: the tasks are cancelled, then
    submitted again with the objects scattered anew, and every result and progress count is
    right."""
    from distributed import Client, LocalCluster

    scatter = Client.scatter

    def to_one_worker(self, data, **kwargs):
        kwargs["broadcast"] = False
        return scatter(self, data, **kwargs)

    monkeypatch.setattr(Client, "scatter", to_one_worker)
    marker = str(tmp_path / "died")
    reports = []
    with LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=None, processes=True
    ) as cluster:
        results = map_tasks(
            functools.partial(weighted_sum_dying_once, marker),
            [(i,) for i in range(6)],
            scheduler=cluster.scheduler_address,
            shared=([3, 5, 7, 11, 13, 17],),
            progress=lambda *report: reports.append(report),
            description="sums",
        )
    assert os.path.exists(marker), "no worker died: the test did not test anything"
    assert results == [0, 5, 14, 33, 52, 85]
    assert [done for _, done, _ in reports] == list(range(1, 7))
