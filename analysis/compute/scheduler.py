"""What a computation runs on, as its tasks and planners ask it: the cluster or local threads, how many
tasks run at once, the memory limit, one BLAS thread per task.

:func:`analysis.compute.context.compute_on` sets these up; everything that sizes its work reads them here (this
module imports nothing of ``analysis``, so any module may).
"""

from __future__ import annotations

import os

import dask

MEMORY_LIMIT_KEY = "resdiff.memory_limit"  # the dask config key compute_on sets
_BLAS_LIMIT = []  # controllers kept alive so that the limit holds for the life of the process


def cluster_client():
    """The dask.distributed client that computations go to, or None (local threads)."""
    import sys

    if "distributed" not in sys.modules:
        return None
    from distributed import get_client

    try:
        return get_client()
    except ValueError:  # no client in this context
        return None


def parallelism() -> int:
    """Tasks that run at once under the current scheduler: a cluster's threads or the local threads."""
    client = cluster_client()
    if client is not None:
        return max(1, sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()))
    return int(dask.config.get("num_workers", None) or os.cpu_count() or 1)


def pin_blas_threads() -> None:
    """Limit BLAS/OpenMP pools of this process to one thread, for as long as it lives."""
    from threadpoolctl import ThreadpoolController

    controller = ThreadpoolController()
    _BLAS_LIMIT.append((controller, controller.limit(limits=1)))  # kept: the limit lasts while they live


def memory_limit() -> int | None:
    """The ``--memory-limit`` of the enclosing :func:`compute_on`, if any (for steps that size themselves)."""
    return dask.config.get(MEMORY_LIMIT_KEY, None)
