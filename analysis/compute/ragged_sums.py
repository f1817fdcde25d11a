"""Per-position sums over ``dim`` of a ragged store, a task per run of prompt chunks.

The geometric metrics of :mod:`analysis.geometry.metrics` are functions of sums over ``dim``
(:mod:`analysis.compute.dim_sums`). On a ragged store each task here reads the regions of real data
of a run of prompt chunks for every pass (:mod:`analysis.compute.regions`: straight from Zarr where
it can), applies a kernel and lays the result out as padded rows of whole prompts
(NaN on padding): a few dozen tasks where the padded chunks number thousands, and no
padding chunk is read or summed. Axes of the results: (term, prompt, layer, token), or with
``layout="positions"`` (term, layer, position): the real positions only, prompt by prompt in store order,
tokens in order (``row`` and ``token`` coordinates say where each came from), a fifteenth of the padded
rows on a store of ragged texts, so that the metrics derived from the sums cost their real positions.
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


LAYOUTS = ("padded", "positions")


def check_layout(layout: str) -> None:
    """A one-line error for a layout that is not one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        from store.errors import UsageError

        raise UsageError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def sums_over_runs(ds: xr.Dataset, left_q: np.ndarray, right_q: np.ndarray, layout: str = "padded") -> xr.DataArray:
    """:func:`analysis.compute.dim_sums.residual_sums` of every real position: ``S + 2Q`` terms."""
    kernel = partial(residual_sums, left_q=left_q, right_q=right_q)
    return _over_runs(ds, kernel, ds.sizes["pass_"] + 2 * len(left_q), ("sums", left_q, right_q), layout)


def previous_layer_dots_over_runs(ds: xr.Dataset, layout: str = "padded") -> xr.DataArray:
    """``sum_d h_l h_(l-1)`` per pass (NaN at layer 0): ``S`` terms."""
    return _over_runs(ds, _previous_dots, ds.sizes["pass_"], ("previous-layer-dots",), layout)


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


def _run_positions_task(pieces: list, kernel, shape: tuple, n_tokens_p: np.ndarray) -> np.ndarray:
    # (term, layer, position): each piece's real cells, prompt by prompt (n_tokens_p: the run's prompts)
    out = np.full(shape, np.nan)  # (every position is written: NaN would say one was not)
    starts = np.concatenate([[0], np.cumsum(n_tokens_p)])
    for row_start, row_stop, token_start, token_stop, reads in pieces:
        sums = kernel([materialize(read)[0] for read in reads])  # (term, prompt, layer, token)
        for p in range(row_start, row_stop):
            stop = min(token_stop, int(n_tokens_p[p]))
            if stop > token_start:
                out[:, :, starts[p] + token_start:starts[p] + stop] = sums[:, p - row_start, :, :stop - token_start]
    return out


RUN_BYTES = 4 * TARGET_CHUNK_BYTES  # what a task holds: the regions it reads at once and its padded result
# Under a memory limit a run is smaller: each metric derived from a run's sums is another array of its padded
# result's size, and a report keeps several of them per running task (measured: 1.64 GB at 1 GB with 64 MiB runs).
# Over real positions only the derived arrays are a fifteenth of that, and larger runs mean fewer tasks.
LIMIT_SHARE = {"padded": 48, "positions": 12}


def run_bytes(layout: str = "padded") -> int:
    """What a task may hold: :data:`RUN_BYTES`, or less under ``--memory-limit`` (a :data:`LIMIT_SHARE` of it,
    at least 4 MiB)."""
    from analysis.compute.scheduler import memory_limit

    limit = memory_limit()
    return RUN_BYTES if limit is None else int(min(RUN_BYTES, max(4 << 20, limit // LIMIT_SHARE[layout])))


def _plan(ds: xr.Dataset, n_terms: int, layout: str = "padded") -> list[tuple]:
    """Per run: (run, pieces as (store rows, tokens) read together, bytes the task holds at most).

    Read straight from Zarr, a piece is a slab of tokens of one prompt chunk (about a store chunk per
    pass) and only one piece is in memory at a time; assembled from Dask chunks, the whole run is.
    """
    n_pass, _, n_layer, n_tokens, n_dim = ds.resid.shape
    chunks, itemsize = ds.resid.data.chunks, ds.resid.dtype.itemsize
    direct = direct_regions(ds.resid) is not None
    cell, per_prompt = n_pass * n_layer * n_dim * itemsize, n_terms * n_layer * n_tokens * 8
    per_position = n_terms * n_layer * 8 if layout == "positions" else 0  # the result: real positions only
    n_tokens_p = np.asarray(ds.n_tokens.values)
    plan = []
    # (grouped with a result cell for every (prompt, token) of the regions: an upper bound on the real ones)
    for run in prompt_runs(n_tokens_p, chunks[1][0], chunks[3][0], n_tokens, cell + per_position,
                           run_bytes(layout), prompt_bytes=0 if per_position else per_prompt):
        pieces = []
        for rows, extent in zip(run.chunk_rows, run.extents, strict=True):
            slab = token_slab(rows.stop - rows.start, n_layer * n_dim, itemsize, chunks[3][0], extent, direct)
            pieces += [(rows, slice(start, min(extent, start + slab))) for start in range(0, extent, slab)]
        read = [(r.stop - r.start) * (t.stop - t.start) * cell for r, t in pieces]
        result = (int(np.minimum(n_tokens_p[run.rows], n_tokens).sum()) * per_position if per_position
                  else (run.rows.stop - run.rows.start) * per_prompt)
        held = result + (max(read) if direct else sum(read))
        plan.append((run, pieces, held))
    return plan


def task_bytes(ds: xr.Dataset, n_terms: int) -> int:
    """The most a task of ``n_terms`` terms holds on ``ds`` (for the memory model of ``analysis.compute.context``)."""
    return max(held for _, _, held in _plan(ds, n_terms))


def _over_runs(ds: xr.Dataset, kernel, n_terms: int, what: tuple, layout: str = "padded") -> xr.DataArray:
    check_layout(layout)
    resid = ds.resid
    n_pass, _, n_layer, n_tokens, _ = resid.shape
    n_tokens_p = np.asarray(ds.n_tokens.values).astype(np.int64)
    plan = _plan(ds, n_terms, layout)
    # The runs are part of the name: graphs built under different memory limits have different runs.
    bounds = [(run.rows.start, run.rows.stop) for run, _, _ in plan]
    name = f"{what[0]}-over-runs-{layout}-" + tokenize(resid.data.name, *what[1:], n_tokens_p, bounds)
    graph = {}
    for r, (run, pieces, _) in enumerate(plan):
        tasks = [[rows.start - run.rows.start, rows.stop - run.rows.start, tokens.start, tokens.stop,
                  [region(resid, {"pass_": slice(s, s + 1), "prompt": rows, "token": tokens}) for s in range(n_pass)]]
                 for rows, tokens in pieces]
        if layout == "padded":
            graph[(name, 0, r, 0, 0)] = (_run_task, tasks, kernel, (n_terms, run.rows.stop - run.rows.start, n_layer,
                                                                     n_tokens))
        else:
            lengths = np.minimum(n_tokens_p[run.rows], n_tokens)
            graph[(name, 0, 0, r)] = (_run_positions_task, tasks, kernel, (n_terms, n_layer, int(lengths.sum())),
                                      lengths)
    runs = [run for run, _, _ in plan]
    if layout == "positions":
        return _positions_array(ds, da.Array(region_graph(name, graph, resid), name, (
            (n_terms,), (n_layer,), tuple(int(np.minimum(n_tokens_p[run.rows], n_tokens).sum()) for run in runs)),
            dtype=np.float64, meta=np.empty((0, 0, 0), np.float64)))
    chunks = ((n_terms,), tuple(run.rows.stop - run.rows.start for run in runs), (n_layer,), (n_tokens,))
    sums = da.Array(region_graph(name, graph, resid), name, chunks, dtype=np.float64,
                    meta=np.empty((0, 0, 0, 0), np.float64))
    return xr.DataArray(sums, dims=("term", "prompt", "layer", "token"),
                        coords={d: ds[d] for d in ("prompt", "layer", "token")})


def _positions_array(ds: xr.Dataset, sums: da.Array) -> xr.DataArray:
    """(term, layer, position) with each position's store ``row``, ``token`` and prompt label (``prompt``), and
    the padded token axis's length (``token_slots``)."""
    rows, tokens = position_index(np.asarray(ds.n_tokens.values), ds.sizes["token"])
    return xr.DataArray(sums, dims=("term", "layer", "position"),
                        coords={"layer": ds.layer, "row": ("position", rows), "token": ("position", tokens),
                                "prompt": ("position", ds.prompt.values[rows]), "token_slots": ds.sizes["token"]})


def position_index(n_tokens_p: np.ndarray, n_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(store row, token) of every real position, prompt by prompt, tokens in order.

    >>> [x.tolist() for x in position_index(np.array([2, 1]), 4)]
    [[0, 0, 1], [0, 1, 0]]
    """
    lengths = np.minimum(np.asarray(n_tokens_p, dtype=np.int64), n_tokens)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return rows, np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
