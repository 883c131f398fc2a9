"""Which dask scheduler runs an analysis: local threads, a LocalCluster, or a running
dask.distributed scheduler at an address."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
