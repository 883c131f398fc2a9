"""Where dask work runs: local threads, a LocalCluster, or a running dask.distributed scheduler
at an address (`dask_scheduler`), and the one fan-out of independent tasks every analysis uses
(`map_tasks`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import dask

from hydra_store.errors import SchedulerError

SCHEDULER_HELP = (
    "'threads' (default: local threads), 'local-cluster' (start a dask.distributed LocalCluster "
    "of worker processes), or the address of a running dask.distributed scheduler "
    "(tcp://host:port)"
)


@contextlib.contextmanager
def dask_scheduler(
    spec: str | None = "threads", *, n_workers: int | None = None, memory_limit: str | None = None
) -> Iterator[object | None]:
    """Run the dask computations inside the block on the scheduler named by `spec`.

    Yields the dask.distributed Client, or None for local threads. A LocalCluster's workers
    are processes: a script that uses it needs the `if __name__ == "__main__":` guard.
    """
    if spec in (None, "", "threads"):
        with dask.config.set(scheduler="threads"):
            yield None
        return
    from distributed import Client, LocalCluster

    if spec == "local-cluster":
        kwargs = {"n_workers": n_workers or 2, "threads_per_worker": 1, "dashboard_address": None}
        if memory_limit is not None:
            kwargs["memory_limit"] = memory_limit
        try:
            cluster = LocalCluster(**kwargs)
        except Exception as error:  # start-up failures come in many types
            raise SchedulerError(f"could not start a dask LocalCluster: {error}") from error
        with cluster, Client(cluster) as client:
            yield client
        return
    address = spec if "://" in spec else f"tcp://{spec}"
    try:
        client = Client(address, timeout="5s")
    except (OSError, TimeoutError) as error:
        raise SchedulerError(
            f"no dask scheduler answered at {address}: {error}. Start one with "
            "`dask scheduler`, or use --scheduler threads"
        ) from error
    except ValueError as error:
        raise SchedulerError(
            f"--scheduler {spec!r} is not a valid address; {SCHEDULER_HELP}"
        ) from error
    with client:
        yield client


T = TypeVar("T")


def map_tasks(
    function: Callable[..., T],
    arguments: Sequence[tuple[Any, ...]],
    *,
    scheduler: str | None = "threads",
    progress: Callable[[str, int, int], None] | None = None,
    description: str = "tasks",
    n_workers: int | None = None,
    shared: tuple[Any, ...] = (),
) -> list[T]:
    """`[function(*shared, *args) for args in arguments]`, each call an independent dask task
    on the scheduler named by `scheduler`, in the order of `arguments`, reporting
    `progress(description, finished, total)` as tasks finish. `n_workers`: threads at once
    (local threads), or workers of a LocalCluster (default: dask's).

    On a cluster `function` and its arguments are pickled to worker processes: it must be a
    module-level function. `shared` objects (a model, a data set) are sent to every worker once
    (scattered with broadcast), not once per task.
    """
    total = len(arguments)
    with dask_scheduler(scheduler, n_workers=n_workers) as client:
        if client is None:
            lock = threading.Lock()
            finished = [0]

            def task(*args: Any) -> T:
                result = function(*shared, *args)
                with lock:
                    finished[0] += 1
                    if progress is not None:
                        progress(description, finished[0], total)
                return result

            tasks = [dask.delayed(task, pure=False)(*args) for args in arguments]
            return list(dask.compute(*tasks, num_workers=n_workers))
        return _map_on_cluster(client, function, arguments, shared, progress, description)


# Times the shared objects are scattered again after a worker that held them died.
LOST_DATA_RETRIES = 3


def _map_on_cluster(client, function, arguments, shared, progress, description) -> list:
    """`map_tasks` on a dask.distributed client. A worker that dies takes its tasks with it
    (the scheduler runs them again elsewhere) and possibly the only copy of a scattered object
    (dask's memory manager may drop broadcast replicas): the tasks that needed it are then
    cancelled, and they are submitted again with the objects scattered anew."""
    from distributed import as_completed

    total = len(arguments)
    results: list[Any] = [None] * total
    todo = list(range(total))
    done = 0
    for _ in range(LOST_DATA_RETRIES + 1):
        sent = [client.scatter(item, broadcast=True, hash=False) for item in shared]
        futures = {client.submit(function, *sent, *arguments[n], pure=False): n for n in todo}
        cancelled = []
        for future in as_completed(futures):
            if future.cancelled():
                cancelled.append(futures[future])
                continue
            results[futures[future]] = future.result()
            done += 1
            if progress is not None:
                progress(description, done, total)
        if not cancelled:
            return results
        todo = sorted(cancelled)
    raise SchedulerError(
        f"{len(todo)} of {total} {description} were cancelled {LOST_DATA_RETRIES + 1} times: "
        "the workers holding their data kept dying; check the cluster's workers (memory "
        "limits, nanny restarts) and run again"
    )
