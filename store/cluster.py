"""Connecting to a dask.distributed cluster: an existing scheduler or workers started on loopback.

Shared by distributed capture (``capture.distributed``) and distributed analysis
(``analysis.compute``). ``distributed`` is imported only when a cluster is asked for.
"""

from __future__ import annotations

from store.errors import UsageError


def connect(scheduler: str | None, local_cluster: int | None, memory_limit: int | None = None,
            resources: dict[str, float] | None = None):
    """(client, cluster): a client of ``scheduler``, or of ``local_cluster`` new worker processes.

    ``cluster`` is None for an existing scheduler; close both when done. Local workers
    get one thread each, ``memory_limit`` split between them, and ``resources`` each.
    """
    from distributed import Client, LocalCluster

    if scheduler and local_cluster is not None:
        raise UsageError("give either --scheduler or --local-cluster, not both")
    if local_cluster is not None:
        if local_cluster < 1:
            raise UsageError(f"--local-cluster needs at least 1 worker, got {local_cluster}")
        per_worker = memory_limit // local_cluster if memory_limit else "auto"
        cluster = LocalCluster(n_workers=local_cluster, threads_per_worker=1, processes=True,
                               dashboard_address=None, memory_limit=per_worker, resources=resources)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="10s"), None
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"could not reach the Dask scheduler at {scheduler} ({exc.__class__.__name__}); "
                         "start one with `dask scheduler` and workers with `dask worker ADDRESS`, "
                         "or use --local-cluster N") from None
