"""dask.distributed pieces, imported only when a cluster is used (distributed is a heavy import)."""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from analysis.compute.scheduler import pin_blas_threads


class PinBlasPlugin(WorkerPlugin):
    """One BLAS thread per worker process, for workers present and future.

    Workers started by ``LocalCluster`` already get ``OPENBLAS_NUM_THREADS=1`` in their
    environment; workers started by hand (``dask worker``) do not.
    """

    name = "resdiff-pin-blas"

    def setup(self, worker) -> None:
        pin_blas_threads()
