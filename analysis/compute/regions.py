"""Runs of whole prompt chunks of a ragged store, and the regions of real data they cover.

A ragged store lays its prompts out longest first and cuts them into (prompt, token)
chunks, so the chunks of prompt chunk ``c`` that hold real positions are its first
``ceil(longest_c / chunk_token)`` token chunks (``store.chunking.real_blocks``): one
rectangle from token 0. A *run* is a few consecutive prompt chunks, about a target size
of such rectangles; each rectangle (with one block of the other axes) is a *region*, read
in one call straight from Zarr when the array is a local store's as ``open_store`` gave
it (``store.reader.direct_regions``), else assembled from the Dask chunks that cover it.
Either way no padding-only chunk is touched, and a run is one task, not one per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
from dask.highlevelgraph import HighLevelGraph

from store.chunking import TARGET_CHUNK_BYTES
from store.reader import ArrayRegions, direct_regions


@dataclass(frozen=True)
class Run:
    """Consecutive prompt chunks: their store rows and, per chunk, the tokens from 0 covering its real chunks."""

    rows: slice
    chunk_rows: tuple[slice, ...]
    extents: tuple[int, ...]


def prompt_runs(n_tokens_p: np.ndarray, chunk_prompt: int, chunk_token: int, n_tokens: int,
                cell_bytes: int, target_bytes: int | None = TARGET_CHUNK_BYTES, prompt_bytes: int = 0) -> list[Run]:
    """Group the prompt chunks into runs of about ``target_bytes`` (``None``: a chunk per run).

    A prompt costs ``cell_bytes`` per (prompt, token) cell of its region plus ``prompt_bytes``
    (e.g. its row of a padded result).

    >>> [(r.rows, r.extents) for r in prompt_runs(np.array([9, 7, 3, 2]), 2, 4, 10, 1, target_bytes=24)]
    [(slice(0, 2, None), (10,)), (slice(2, 4, None), (4,))]
    """
    runs, pending = [], []

    def close() -> None:
        if pending:
            runs.append(Run(slice(pending[0][0].start, pending[-1][0].stop), tuple(p[0] for p in pending),
                            tuple(p[1] for p in pending)))
            pending.clear()

    held = 0
    for start in range(0, len(n_tokens_p), chunk_prompt):
        rows = slice(start, min(start + chunk_prompt, len(n_tokens_p)))
        extent = min(n_tokens, -(-int(n_tokens_p[rows].max()) // chunk_token) * chunk_token)
        size = (rows.stop - rows.start) * (extent * cell_bytes + prompt_bytes)
        if pending and (target_bytes is None or held + size > target_bytes):
            close()
            held = 0
        pending.append((rows, extent))
        held += size
    close()
    return runs


class _Read:
    """A region read straight from Zarr when the task runs (a literal in the graph: a path and slices)."""

    def __init__(self, source: ArrayRegions, index: tuple):
        self.source, self.index = source, index


class _Crop:
    """The region's place within the Dask chunks that cover it (a literal in the graph)."""

    def __init__(self, index: tuple):
        self.index = index


def read_later(source: ArrayRegions, index: tuple) -> _Read:
    """A region of any store array (``source``) that a task reads when it runs: for arrays :func:`region` has
    no direct reads of (statistics, ids), given a source of its own. :func:`materialize` reads it."""
    return _Read(source, index)


def _add_up(parts: list[np.ndarray], shape: tuple) -> np.ndarray:
    out = np.zeros(shape)
    for part in parts:
        out += part
    return out


def summed_over_runs(name: str, run_tasks: list[tuple], shape: tuple, dependencies=()) -> da.Array:
    """One float64 block of ``shape``: the sum of ``run_tasks``, the tasks (one per run of prompt chunks) that
    each return such an array. The runs' partial results are small (a few numbers, or (pass, layer, dim)
    sums); no run, no partial: zeros."""
    graph = {(name + "-run", r): task for r, task in enumerate(run_tasks)}
    graph[(name, *(0,) * len(shape))] = (_add_up, [(name + "-run", r) for r in range(len(run_tasks))], shape)
    layer = HighLevelGraph.from_collections(name, graph, dependencies=list(dependencies))
    return da.Array(layer, name, tuple((n,) for n in shape), dtype=np.float64,
                    meta=np.empty((0,) * len(shape), np.float64))


def stacked_over_runs(name: str, run_tasks: list[tuple], run_rows: list[slice], lead: tuple, tail: tuple
                      ) -> da.Array:
    """A float64 array (*lead, prompt, *tail) whose block ``r`` along ``prompt`` is ``run_tasks[r]``'s result,
    (*lead, rows of run r, *tail): per-prompt results of runs that cover the prompts in order, each kept
    where it was computed (no run's result holds the other prompts' zeros)."""
    graph = {(name, *(0,) * len(lead), r, *(0,) * len(tail)): task for r, task in enumerate(run_tasks)}
    layer = HighLevelGraph.from_collections(name, graph, dependencies=[])
    chunks = (*((n,) for n in lead), tuple(rows.stop - rows.start for rows in run_rows), *((n,) for n in tail))
    return da.Array(layer, name, chunks, dtype=np.float64, meta=np.empty((0,) * (len(lead) + 1 + len(tail)),
                                                                        np.float64))


def materialize(region) -> np.ndarray:
    """The array of a region made by :func:`region`, inside a task."""
    if isinstance(region, _Read):
        return region.source.read(region.index)
    crop, blocks = region
    return np.block(blocks)[crop.index]


def region(var: xr.DataArray, index: dict[str, slice]):
    """What a task needs to read ``var`` over ``index`` (a slice per dimension named, the whole axis for
    the others): a direct read, or the nested keys of the Dask chunks covering it and where it lies in them."""
    where = tuple(index.get(d, slice(0, n)) for d, n in zip(var.dims, var.shape, strict=True))
    source = direct_regions(var)
    if source is not None:
        return _Read(source, where)
    data: da.Array = var.data
    bounds = [np.cumsum((0, *c)) for c in data.chunks]
    covering = [[b for b in range(len(c)) if bounds[a][b] < where[a].stop and bounds[a][b + 1] > where[a].start]
                for a, c in enumerate(data.chunks)]
    crop = tuple(slice(w.start - int(b[c[0]]), w.stop - int(b[c[0]])) for w, b, c in zip(where, bounds, covering,
                                                                                          strict=True))

    def nest(axis: int, prefix: tuple) -> list:
        if axis == data.ndim - 1:
            return [(data.name, *prefix, b) for b in covering[axis]]
        return [nest(axis + 1, (*prefix, b)) for b in covering[axis]]

    return [_Crop(crop), nest(0, ())]


def region_graph(name: str, tasks: dict, var: xr.DataArray) -> HighLevelGraph:
    """The graph of tasks made with :func:`region` over ``var``: read straight from Zarr, they need
    nothing of ``var``'s own graph (one task per chunk of the padded array, materialised at compute)."""
    return HighLevelGraph.from_collections(name, tasks, dependencies=[] if direct_regions(var) else [var.data])


def token_slab(rows: int, other_cells: int, itemsize: int, chunk_token: int, extent: int, direct: bool) -> int:
    """Tokens per read of a region: about a store chunk's worth when read from Zarr, all at once when
    assembled from Dask chunks (those are in memory already)."""
    if not direct:
        return extent
    per_token = max(1, rows * other_cells * itemsize)
    return max(chunk_token, TARGET_CHUNK_BYTES // per_token // chunk_token * chunk_token)
