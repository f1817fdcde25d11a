"""Where lazy results are computed: local threads (default), threads under a memory limit, or a
dask.distributed cluster (an existing one, or one started on loopback).

Analysis functions stay lazy; :func:`compute_on` only sets the scheduler that a later
``.compute()`` uses. BLAS libraries get one thread per Dask worker thread everywhere:
Dask already runs one task per core, and BLAS threads on top of that fight over the
same cores (a Dask QR on 2 cores took twice as long with BLAS's default threads).

Memory model of a bounded local run (measured in ``benchmarks/report.py``): each
running task holds the chunks of one (prompt, layer) tile of every pass, and the
scheduler keeps about one more tile in flight per thread plus one being released, so
the working set is about ``(1 + 2 x threads) x tile`` bytes, plus what glibc keeps
for reuse: two more tiles with one heap for all threads (:func:`share_one_heap`, which
``cli.py`` sets up under ``--memory-limit``), three with its default heap per thread
(see :func:`threads_for`), on top of the process's own footprint (interpreter,
libraries, store metadata), which the limit does not count.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator

import dask
import numpy as np
import xarray as xr

from analysis.compute.scheduler import MEMORY_LIMIT_KEY
from store.errors import UsageError
from store.units import format_bytes, parse_size

_ONE_HEAP = False  # set by share_one_heap


DEFAULT_MEMORY_SHARE = 0.25  # of this machine's memory, the --memory-limit when none is given


def default_memory_limit() -> int:
    """The ``--memory-limit`` of a command that was given none: a quarter of this machine's memory."""
    import psutil

    return int(psutil.virtual_memory().total * DEFAULT_MEMORY_SHARE)


def parse_memory(text: str | int) -> int:
    """Bytes from ``1GB``, ``512MiB``, ``2e9`` or an int; a one-line error otherwise."""
    return parse_size(text, "--memory-limit")


def tile_bytes(ds: xr.Dataset) -> int:
    """Bytes of one (prompt, layer) tile of every pass (or pair): the unit a metric task holds (on a
    ragged store, the largest run of prompt chunks a task reads, with its padded result)."""
    from analysis.compute import ragged_sums
    from analysis.geometry.metrics import store_pass_pairs

    largest = 0
    if ragged_sums.applies(ds):
        largest = ragged_sums.task_bytes(ds, ds.sizes["pass_"] + 2 * len(store_pass_pairs(ds)[0]))
    for var in ds.data_vars.values():
        if var.chunks is None or var.ndim < 4:
            continue
        chunk = int(np.prod([max(c) for c in var.chunks], dtype=np.int64)) * var.dtype.itemsize
        lead = next((var.sizes[d] for d in ("pass_", "pair") if d in var.dims), 1)
        largest = max(largest, chunk * lead)
    return largest


def share_one_heap() -> bool:
    """Make every thread allocate from one glibc heap (``M_ARENA_MAX`` = 1); True when in effect.

    glibc gives each thread its own heap, and each keeps freed chunk-sized buffers for its
    own reuse; with one heap a buffer freed by one thread is reused by the next, so a
    bounded run needs ``(3 + 2 x threads)`` tiles (measured: the metric 3.3 and 5.7 with one
    and two threads, a whole report 6.6 with two) at full speed, where
    returning buffers to the OS (:func:`release_freed_memory_early`) costs page faults on
    every chunk (2.1x the time on 16 MiB chunks). Only threads started afterwards are
    bound by it, so it is done first thing (``cli.py`` with ``--memory-limit``) and
    refused once other threads run.
    """
    global _ONE_HEAP
    if _ONE_HEAP or threading.active_count() > 1:
        return _ONE_HEAP
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_arena_max = -8
    _ONE_HEAP = libc.mallopt(m_arena_max, 1) == 1
    return _ONE_HEAP


def threads_for(limit: int, tile: int, cores: int | None = None, one_heap: bool = False) -> tuple[int, bool]:
    """(threads, tight): the most threads whose working set fits ``limit``; an error if one does not.

    With one heap (:func:`share_one_heap`) a run needs ``(3 + 2 x threads)`` tiles. Otherwise,
    with glibc's default allocator (which keeps freed chunk buffers for reuse: fast, but
    they count) it needs ``(4 + 2 x threads)`` tiles; with freed buffers returned
    to the OS at once (:func:`release_freed_memory_early`, "tight") ``(1 + 2 x threads)``
    tiles, at a cost in page faults. Tight is chosen when it allows at least twice the threads.
    """
    cores = cores or os.cpu_count() or 1
    tiles = limit // max(tile, 1)
    if one_heap:
        threads = min(cores, (tiles - 3) // 2)
        if threads < 1:
            raise UsageError(f"--memory-limit {format_bytes(limit)} is below what one task of this store needs "
                             f"(about {format_bytes(5 * tile)}: 5 x a {format_bytes(tile)} tile of all passes); "
                             f"raise it to at least {format_bytes(5 * tile)}")
        return threads, False
    roomy, tight = min(cores, (tiles - 4) // 2), min(cores, (tiles - 1) // 2)
    if tight < 1:
        need = 3 * tile
        raise UsageError(f"--memory-limit {format_bytes(limit)} is below what one task of this store needs "
                         f"(about {format_bytes(need)}: 3 x a {format_bytes(tile)} tile of all passes); "
                         f"raise it to at least {format_bytes(need)}")
    # Returning buffers to the OS costs page faults: worth it only for twice the threads.
    if tight >= 2 * max(roomy, 0):
        return tight, True
    return roomy, False


def release_freed_memory_early(mmap_threshold: int = 1 << 20) -> None:
    """Make glibc return freed buffers of ``mmap_threshold`` bytes or more to the OS at once
    (no-op elsewhere).

    Chunk-sized buffers otherwise drift below glibc's adaptive mmap threshold and stay
    in the heap after they are freed, which inflates a bounded run's peak RSS by a third.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, int(mmap_threshold))
    libc.mallopt(m_trim_threshold, 1 << 20)


@contextlib.contextmanager
def compute_on(client=None, memory_limit: int | None = None, tile: int = 0) -> Iterator[str]:
    """Run the block's computations on a cluster or on local threads; yields a one-line description.

    ``client`` is a ``distributed.Client`` the caller opened (and closes): its workers run the
    block's computations, each pinned to one BLAS thread. Without one, local threads run them:
    ``memory_limit`` bytes for the computation set the thread count from ``tile`` (the bytes one task
    holds, :func:`tile_bytes`).

    Examples
    --------
    >>> import dask
    >>> with compute_on(memory_limit=2**30, tile=2**20) as where:
    ...     where.startswith("local threads"), dask.config.get("scheduler")
    (True, 'threads')
    """
    if client is not None:
        from analysis.compute.worker_plugins import PinBlasPlugin  # imports distributed, which only a cluster needs

        client.register_plugin(PinBlasPlugin())
        n = len(client.scheduler_info()["workers"])
        with client.as_current(), dask.config.set(scheduler=client):
            yield f"dask.distributed at {client.scheduler.address} ({n} workers)"
        return
    threads = os.cpu_count() or 1
    if memory_limit:
        threads, tight = threads_for(memory_limit, tile, threads, one_heap=_ONE_HEAP)
        if tight:
            release_freed_memory_early()
    from threadpoolctl import threadpool_limits

    # rechunks by tasks: dask would otherwise import distributed (0.35 s) to look for a cluster on every rechunk
    with threadpool_limits(limits=1), dask.config.set({"scheduler": "threads", "num_workers": threads,
                                                       "array.rechunk.method": "tasks",
                                                       MEMORY_LIMIT_KEY: memory_limit}):
        limit = f", memory limit {format_bytes(memory_limit)}" if memory_limit else ""
        yield f"local threads ({threads}{limit})"
