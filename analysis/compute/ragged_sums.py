"""Per-position sums over ``dim`` of a ragged store, a task per run of prompt chunks.

The geometric metrics of :mod:`analysis.geometry.metrics` are functions of sums over ``dim``
(:mod:`analysis.compute.dim_sums`). On a ragged store each task here reads the regions of real data
of a run of prompt chunks for every pass (:mod:`analysis.compute.regions`: straight from Zarr where
it can), applies a kernel and lays the result out as padded rows of whole prompts
(NaN on padding): a few dozen tasks where the padded chunks number thousands, and no
padding chunk is read or summed. Axes of the results: (term, prompt, layer, token).
"""

from __future__ import annotations

from functools import partial

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from analysis.compute.dim_sums import previous_layer_dots, residual_sums
from analysis.compute.positions import has_padding_chunks
from analysis.compute.regions import materialize, prompt_runs, region, region_graph, token_slab
from store.chunking import TARGET_CHUNK_BYTES
from store.reader import direct_regions

LAYOUT = ("pass_", "prompt", "layer", "token", "dim")  # as a store holds resid


def applies(ds: xr.Dataset) -> bool:
    """True for a store's ``resid`` in its own layout with padding-only chunks (the run path pays off)."""
    return "resid" in ds and ds.resid.dims == LAYOUT and has_padding_chunks(ds)


def sums_over_runs(ds: xr.Dataset, left_q: np.ndarray, right_q: np.ndarray) -> xr.DataArray:
    """:func:`analysis.compute.dim_sums.residual_sums` of every real position: ``S + 2Q`` terms."""
    kernel = partial(residual_sums, left_q=left_q, right_q=right_q)
    return _over_runs(ds, kernel, ds.sizes["pass_"] + 2 * len(left_q), ("sums", left_q, right_q))


def previous_layer_dots_over_runs(ds: xr.Dataset) -> xr.DataArray:
    """``sum_d h_l h_(l-1)`` per pass (NaN at layer 0): ``S`` terms."""
    return _over_runs(ds, _previous_dots, ds.sizes["pass_"], ("previous-layer-dots",))


def terms_over_runs(ds: xr.Dataset, kernel, n_terms: int, name: str) -> xr.DataArray:
    """Any per-position ``kernel(passes) -> (n_terms, prompt, layer, token)`` over the runs (e.g. the
    factorial's terms); ``name`` tells graphs of different kernels apart."""
    return _over_runs(ds, kernel, n_terms, (name,))


def _previous_dots(passes: list[np.ndarray]) -> np.ndarray:
    return np.stack([previous_layer_dots(x, layer_axis=1) for x in passes])  # x: (prompt, layer, token, dim)


def _run_task(pieces: list, kernel, shape: tuple) -> np.ndarray:
    out = np.full(shape, np.nan)
    for row_start, row_stop, token_start, token_stop, reads in pieces:
        passes = [materialize(read)[0] for read in reads]  # each (prompt, layer, token, dim)
        out[:, row_start:row_stop, :, token_start:token_stop] = kernel(passes)
    return out


RUN_BYTES = 4 * TARGET_CHUNK_BYTES  # what a task holds: the regions it reads at once and its padded result
# Under a memory limit a run is smaller: each metric derived from a run's sums is another array of its padded
# result's size, and a report keeps several of them per running task (measured: 1.64 GB at 1 GB with 64 MiB runs).
LIMIT_SHARE = 48


def run_bytes() -> int:
    """What a task may hold: :data:`RUN_BYTES`, or less under ``--memory-limit`` (1/48 of it, at least 4 MiB)."""
    from analysis.compute.scheduler import memory_limit

    limit = memory_limit()
    return RUN_BYTES if limit is None else int(min(RUN_BYTES, max(4 << 20, limit // LIMIT_SHARE)))


def _plan(ds: xr.Dataset, n_terms: int) -> list[tuple]:
    """Per run: (run, pieces as (store rows, tokens) read together, bytes the task holds at most).

    Read straight from Zarr, a piece is a slab of tokens of one prompt chunk (about a store chunk per
    pass) and only one piece is in memory at a time; assembled from Dask chunks, the whole run is.
    """
    n_pass, _, n_layer, n_tokens, n_dim = ds.resid.shape
    chunks, itemsize = ds.resid.data.chunks, ds.resid.dtype.itemsize
    direct = direct_regions(ds.resid) is not None
    cell, per_prompt = n_pass * n_layer * n_dim * itemsize, n_terms * n_layer * n_tokens * 8
    plan = []
    for run in prompt_runs(np.asarray(ds.n_tokens.values), chunks[1][0], chunks[3][0], n_tokens, cell, run_bytes(),
                           prompt_bytes=per_prompt):
        pieces = []
        for rows, extent in zip(run.chunk_rows, run.extents, strict=True):
            slab = token_slab(rows.stop - rows.start, n_layer * n_dim, itemsize, chunks[3][0], extent, direct)
            pieces += [(rows, slice(start, min(extent, start + slab))) for start in range(0, extent, slab)]
        read = [(r.stop - r.start) * (t.stop - t.start) * cell for r, t in pieces]
        held = (run.rows.stop - run.rows.start) * per_prompt + (max(read) if direct else sum(read))
        plan.append((run, pieces, held))
    return plan


def task_bytes(ds: xr.Dataset, n_terms: int) -> int:
    """The most a task of ``n_terms`` terms holds on ``ds`` (for the memory model of ``analysis.compute.context``)."""
    return max(held for _, _, held in _plan(ds, n_terms))


def _over_runs(ds: xr.Dataset, kernel, n_terms: int, what: tuple) -> xr.DataArray:
    resid = ds.resid
    n_pass, _, n_layer, n_tokens, _ = resid.shape
    plan = _plan(ds, n_terms)
    # The runs are part of the name: graphs built under different memory limits have different runs.
    bounds = [(run.rows.start, run.rows.stop) for run, _, _ in plan]
    name = f"{what[0]}-over-runs-" + tokenize(resid.data.name, *what[1:], ds.n_tokens.values, bounds)
    graph = {}
    for r, (run, pieces, _) in enumerate(plan):
        tasks = [[rows.start - run.rows.start, rows.stop - run.rows.start, tokens.start, tokens.stop,
                  [region(resid, {"pass_": slice(s, s + 1), "prompt": rows, "token": tokens}) for s in range(n_pass)]]
                 for rows, tokens in pieces]
        graph[(name, 0, r, 0, 0)] = (_run_task, tasks, kernel, (n_terms, run.rows.stop - run.rows.start, n_layer,
                                                                 n_tokens))
    runs = [run for run, _, _ in plan]
    chunks = ((n_terms,), tuple(run.rows.stop - run.rows.start for run in runs), (n_layer,), (n_tokens,))
    sums = da.Array(region_graph(name, graph, resid), name, chunks, dtype=np.float64,
                    meta=np.empty((0, 0, 0, 0), np.float64))
    return xr.DataArray(sums, dims=("term", "prompt", "layer", "token"),
                        coords={d: ds[d] for d in ("prompt", "layer", "token")})
