"""Per-prompt reductions of metrics laid out over real positions only: (..., layer, position).

The metrics of a ragged store derived from its per-position sums can be laid out as the
real positions only (``analysis.compute.ragged_sums``, ``layout="positions"``): prompt by
prompt in store order, tokens in order, with each position's store ``row`` and ``token``
as coordinates, and a block per run of prompt chunks. Their per-prompt partials here are
the same numbers, summed in the same order, as those of the padded (prompt, layer, token)
layout in :mod:`analysis.compute.reductions`, which calls these for such metrics.

Axes legend: a = leading labels (e.g. pair), l = layer, q = position, p = prompt (store row),
t = token, m = moment, k = candidate.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from numba import njit

MOMENTS = ("count", "sum", "m2", "min", "max")  # the per-prompt partials of both layouts' moments


def top_by_magnitude(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, flat indices) of the n largest |values| along the last axis, largest first; NaN never wins.

    Ties go to the earlier position, so the answer does not depend on how the work was split:

    >>> top_by_magnitude(np.array([[0.0, -2.0, 2.0, np.nan, 1.0]]), 2)
    (array([[-2.,  2.]]), array([[1, 2]]))
    """
    score = np.where(np.isnan(values), -np.inf, np.abs(values))
    n = min(n, values.shape[-1])
    threshold = np.partition(score, values.shape[-1] - n, axis=-1)[..., -n:].min(axis=-1, keepdims=True)
    above, tied = score > threshold, score == threshold
    wanted = n - above.sum(axis=-1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=-1) <= wanted))  # exactly n per row, earliest ties
    index = np.nonzero(chosen.reshape(-1, values.shape[-1]))[1].reshape(*values.shape[:-1], n)
    order = np.argsort(-np.take_along_axis(score, index, axis=-1), axis=-1, kind="stable")
    index = np.take_along_axis(index, order, axis=-1)
    picked = np.take_along_axis(values, index, axis=-1)
    # Fewer than n real positions: the rest are padding and are reported as NaN / -1.
    index = np.where(np.isnan(picked), -1, index)
    return picked, index


def applies(x: xr.DataArray) -> bool:
    """True for a metric over real positions (a ``position`` axis with store ``row`` and ``token`` coordinates)."""
    return "position" in x.dims and "row" in x.coords and "token" in x.coords


def token_slots(x: xr.DataArray) -> int:
    """The padded layout's token axis length (the ``token_slots`` coordinate, else the last real token + 1)."""
    return int(x.token_slots) if "token_slots" in x.coords else int(x.token.max()) + 1


def prompt_labels(x: xr.DataArray, n_prompts: int) -> np.ndarray:
    """Each store row's prompt label, from the positions' ``prompt`` coordinate (a row without a real position:
    its row number)."""
    labels = np.arange(n_prompts)
    if "prompt" in x.coords:
        labels = labels.astype(np.asarray(x.prompt.values).dtype)
        labels[np.asarray(x.row.values)] = np.asarray(x.prompt.values)
    return labels


def _aligned(x: xr.DataArray) -> xr.DataArray:
    """``x`` with no prompt split between blocks of ``position`` (each boundary moved on to the next prompt's
    first position): a block's per-prompt partials must hold its prompts whole."""
    if x.chunks is None:
        return x
    rows = np.asarray(x.row.values)
    edges = np.cumsum(x.chunks[x.dims.index("position")])[:-1]
    if not len(edges) or (rows[edges - 1] != rows[edges]).all():
        return x
    starts = np.flatnonzero(np.diff(rows)) + 1  # each prompt's first position (but the first prompt's)
    if not len(starts):  # one prompt
        return x.chunk({"position": -1})
    moved = np.unique(starts[np.minimum(np.searchsorted(starts, edges), len(starts) - 1)])
    bounds = np.concatenate([[0], moved[moved > 0], [len(rows)]])
    return x.chunk({"position": tuple(int(b) for b in np.diff(np.unique(bounds)))})


def _blocks(x: xr.DataArray, n_prompts: int) -> tuple[list[tuple[int, int]], list[tuple[np.ndarray, np.ndarray]]]:
    """Per block of ``position``: the store rows it covers (consecutive, every row in one block: a prompt without
    a real position goes to the block after it), and each of its positions' (row within the block, token)."""
    rows, tokens = np.asarray(x.row.values), np.asarray(x.token.values)
    chunks = x.chunks[x.dims.index("position")] if x.chunks is not None else (x.sizes["position"],)
    edges = np.cumsum((0, *chunks))
    starts = [0] + [int(rows[e]) for e in edges[1:-1]]
    bounds = list(zip(starts, [*starts[1:], n_prompts], strict=True))
    ids = [(rows[a:b] - start, tokens[a:b]) for a, b, start in zip(edges[:-1], edges[1:], starts, strict=True)]
    return bounds, ids


def pack_mask(where_pt: xr.DataArray | None, like: xr.DataArray) -> da.Array | np.ndarray:
    """A (prompt, token) mask (store rows; None: all) at ``like``'s positions, in ``like``'s blocks."""
    rows, tokens = np.asarray(like.row.values), np.asarray(like.token.values)
    lazy = like.chunks is not None
    chunks = like.chunks[like.dims.index("position")] if lazy else None
    if where_pt is None:
        keep = np.ones(len(rows), bool)
        return da.from_array(keep, chunks=(chunks,)) if lazy else keep
    where_pt = where_pt.transpose("prompt", "token")
    if where_pt.chunks is None or not lazy:
        keep = np.asarray(where_pt.values, bool)[rows, tokens]
        return da.from_array(keep, chunks=(chunks,)) if lazy else keep
    bounds, ids = _blocks(like, where_pt.sizes["prompt"])
    data = where_pt.data.rechunk((tuple(b - a for a, b in bounds), -1))

    def gather(block: np.ndarray, block_id=None) -> np.ndarray:
        p, t = ids[block_id[0]]
        return np.asarray(block, bool)[p, t]

    return da.map_blocks(gather, data, drop_axis=1, chunks=(chunks,), dtype=bool, meta=np.empty((0,), bool))


@njit(cache=True, nogil=True)
def _moments_kernel(x_alq, keep_q, p_q, t_q, over_token, full, out_mapk):  # pragma: no cover - compiled
    # positions in (prompt, token) order, so each (prompt, k) cell adds its values in the order the padded
    # kernel does
    n_a, n_l, n_q = x_alq.shape
    out_mapk[0] = 0.0
    out_mapk[1] = 0.0
    if full:
        out_mapk[2] = 0.0
        out_mapk[3] = np.inf
        out_mapk[4] = -np.inf
    for a in range(n_a):
        # stage 0: count, sum, min, max; stage 1 (full): the centred sum of squares about the finished means
        for stage in range(2 if full else 1):
            for q in range(n_q):
                if not keep_q[q]:
                    continue
                p = p_q[q]
                for la in range(n_l):
                    v = np.float64(x_alq[a, la, q])
                    if v != v:
                        continue
                    k = la if over_token else t_q[q]
                    if stage == 1:
                        mean = out_mapk[1, a, p, k] / out_mapk[0, a, p, k]
                        out_mapk[2, a, p, k] += (v - mean) ** 2
                        continue
                    out_mapk[0, a, p, k] += 1.0
                    out_mapk[1, a, p, k] += v
                    if full:
                        out_mapk[3, a, p, k] = min(out_mapk[3, a, p, k], v)
                        out_mapk[4, a, p, k] = max(out_mapk[4, a, p, k], v)


def _block_moments(x_lq: np.ndarray, keep_q: np.ndarray, p_q: np.ndarray, t_q: np.ndarray, n_rows: int,
                   n_kept: int, over: str, full: bool) -> np.ndarray:
    lead = x_lq.shape[:-2]
    x_alq = np.ascontiguousarray(x_lq).reshape(-1, *x_lq.shape[-2:])
    out = np.empty((len(MOMENTS) if full else 2, x_alq.shape[0], n_rows, n_kept))
    _moments_kernel(x_alq, np.asarray(keep_q, np.bool_), p_q.astype(np.int64), t_q.astype(np.int64),
                    over == "token", full, out)
    return out.reshape(out.shape[0], *lead, n_rows, n_kept)


def _per_block(name: str, x: xr.DataArray, keep: da.Array, bounds: list, task, chunks: tuple,
               dtype=np.float64) -> da.Array:
    """A dask array (..., prompt, k) with a block per block of ``x``'s positions: ``task(b)`` is
    ``(func, *args)``, called as ``func(x block (..., layer, position), keep block, *args)``."""
    data = x.data.rechunk({a: -1 for a in range(x.ndim - 1)})
    keep = keep.rechunk((data.chunks[-1],))
    n_lead = len(chunks) - 2
    graph = {}
    for b in range(len(bounds)):
        func, *args = task(b)
        graph[(name, *(0,) * n_lead, b, 0)] = (func, (data.name, *(0,) * (x.ndim - 1), b), (keep.name, b), *args)
    layer = HighLevelGraph.from_collections(name, graph, dependencies=[data, keep])
    return da.Array(layer, name, chunks, dtype=dtype, meta=np.empty((0,) * len(chunks), dtype))


def moments(x: xr.DataArray, n_prompts: int, n_tokens: int, where: xr.DataArray | None, over: str,
            full: bool) -> xr.DataArray:
    """:func:`analysis.compute.reductions.prompt_moments` of a metric over real positions:
    (moment, ..., prompt, layer) for ``over="token"``, (moment, ..., prompt, token) for ``over="layer"``."""
    x = _aligned(x.transpose(..., "layer", "position"))
    n_moments = len(MOMENTS) if full else 2
    n_layer = x.sizes["layer"]
    n_kept = n_layer if over == "token" else n_tokens
    keep = pack_mask(where, x)
    bounds, ids = _blocks(x, n_prompts)
    lead_dims = x.dims[:-2]
    lead_shape = tuple(x.sizes[d] for d in lead_dims)
    if x.chunks is None:
        p_q, t_q = ids[0]
        values = _block_moments(x.values, keep, p_q, t_q, n_prompts, n_kept, over, full)
    else:
        name = "position-moments-" + tokenize(x.data.name, keep.name, over, full, n_prompts, n_kept)
        values = _per_block(name, x, keep, bounds, lambda b: (_block_moments, *ids[b], bounds[b][1] - bounds[b][0],
                                                              n_kept, over, full),
                            ((n_moments,), *((s,) for s in lead_shape), tuple(b - a for a, b in bounds), (n_kept,)))
    kept_dim = "layer" if over == "token" else "token"
    coords = {d: x[d] for d in lead_dims if d in x.coords}
    coords["prompt"] = prompt_labels(x, n_prompts)
    coords[kept_dim] = x.layer.values if over == "token" else np.arange(n_tokens)
    return xr.DataArray(values, dims=("moment", *lead_dims, "prompt", kept_dim), coords=coords).assign_coords(
        moment=list(MOMENTS[:n_moments]))


def _block_top(x_lq: np.ndarray, keep_q: np.ndarray, p_q: np.ndarray, t_q: np.ndarray, row0: int, n: int,
               n_tokens: int) -> np.ndarray:
    # (2, ..., 1, n): the n largest |float32 value| of the block's kept positions and their flat (prompt, layer,
    # token) index, largest first, ties to the smaller index (as the padded hotspots); NaN / -1 past the real ones
    lead, (n_layer, n_q) = x_lq.shape[:-2], x_lq.shape[-2:]
    x_alq = x_lq.reshape(-1, n_layer, n_q).astype(np.float32)
    flat = ((p_q.astype(np.int64) + row0) * n_layer * n_tokens)[None, :] + (np.arange(n_layer) * n_tokens)[:, None] \
        + t_q.astype(np.int64)[None, :]
    flat = flat.ravel()
    out = np.full((2, x_alq.shape[0], n), np.nan)
    out[1] = -1
    for a, x in enumerate(x_alq):
        score = np.where(np.asarray(keep_q, bool)[None, :] & ~np.isnan(x), np.abs(x), -np.inf).ravel()
        k = min(n, score.size)
        if k == 0:
            continue
        threshold = np.partition(score, score.size - k)[score.size - k]
        candidates = np.nonzero(score >= threshold)[0]
        pick = candidates[np.lexsort((flat[candidates], -score[candidates]))[:k]]
        real = score[pick] > -np.inf
        out[0, a, :k] = np.where(real, x.ravel()[pick], np.nan)
        out[1, a, :k] = np.where(real, flat[pick], -1)
    return out.reshape(2, *lead, 1, n)


def largest(x: xr.DataArray, n: int, n_prompts: int, n_tokens: int, where: xr.DataArray | None,
            n_rank: int) -> xr.Dataset:
    """:func:`analysis.compute.reductions.hotspots` of a metric over real positions: ``value``, ``prompt`` (store
    row), ``layer`` and ``token`` along ``rank`` (``n_rank`` long), lazily."""
    x = _aligned(x.transpose(..., "layer", "position"))
    labels = [name for name, coord in x.coords.items() if "position" in coord.dims or "layer" in coord.dims]
    keep = pack_mask(where, x)
    bounds, ids = _blocks(x, n_prompts)
    lead_dims = x.dims[:-2]
    lead_shape = tuple(x.sizes[d] for d in lead_dims)
    if x.chunks is None:
        found = _block_top(x.values, keep, *ids[0], 0, n, n_tokens)
    else:
        name = "position-largest-" + tokenize(x.data.name, keep.name, n, n_tokens)
        found = _per_block(name, x, keep, bounds, lambda b: (_block_top, *ids[b], bounds[b][0], n, n_tokens),
                           ((2,), *((s,) for s in lead_shape), (1,) * len(bounds), (n,)))
    n_layer = x.sizes["layer"]

    def merge(found_2abn: np.ndarray) -> np.ndarray:
        values = found_2abn[0].reshape(*found_2abn.shape[1:-2], -1)
        flat = found_2abn[1].reshape(values.shape)
        picked, where_k = top_by_magnitude(values, n_rank)
        index = np.where(where_k >= 0, np.take_along_axis(flat, np.maximum(where_k, 0), axis=-1), -1)
        return np.stack([picked, index])

    if isinstance(found, da.Array):
        merged = da.map_blocks(merge, found.rechunk({found.ndim - 2: -1}), drop_axis=found.ndim - 2,
                               chunks=((2,), *((s,) for s in lead_shape), (n_rank,)), dtype=np.float64,
                               meta=np.empty((0,) * (found.ndim - 1), np.float64))
    else:
        merged = merge(found)
    dims = (*lead_dims, "rank")
    coords = {d: c for d, c in x.drop_vars(labels).coords.items() if set(c.dims) <= set(lead_dims)}
    value = xr.DataArray(merged[0], dims=dims, coords=coords).astype(np.float32)
    index = xr.DataArray(merged[1], dims=dims, coords=coords).astype(np.int64)
    prompt, layer, token = index // (n_layer * n_tokens), (index // n_tokens) % n_layer, index % n_tokens
    valid = index >= 0
    return xr.Dataset({"value": value, **{k: v.where(valid, -1) for k, v in
                                          {"prompt": prompt, "layer": layer, "token": token}.items()}}
                      ).assign_coords(rank=np.arange(n_rank))


def _block_per_prompt(x_lq: np.ndarray, keep_q: np.ndarray, p_q: np.ndarray, t_q: np.ndarray, n_rows: int,
                      n_tokens: int, func) -> np.ndarray:
    # (n_rows, n_tokens): func over each prompt's (..., layer, its tokens) slab, NaN past its tokens
    out = np.full((n_rows, n_tokens), np.nan, np.float32)
    starts = np.searchsorted(p_q, np.arange(n_rows + 1))
    for p in range(n_rows):
        if starts[p + 1] > starts[p]:
            out[p, :starts[p + 1] - starts[p]] = func(x_lq[..., starts[p]:starts[p + 1]][None])[0]
    return out


def per_prompt_tokens(x: xr.DataArray, func, n_prompts: int, n_tokens: int) -> xr.DataArray:
    """(prompt, token) float32: ``func`` of each prompt's (1, ..., layer, token) slab of ``x`` (..., layer,
    position) -> (1, token), e.g. ``analysis.geometry.outliers.peak_ratios``; NaN on padding. Lazy."""
    x = _aligned(x.transpose(..., "layer", "position"))
    bounds, ids = _blocks(x, n_prompts)
    if x.chunks is None:
        values = _block_per_prompt(x.values, None, *ids[0], n_prompts, n_tokens, func)
    else:
        name = "position-per-prompt-" + tokenize(x.data.name, func, n_tokens)
        values = _per_block(name, x, pack_mask(None, x), bounds,
                            lambda b: (_block_per_prompt, *ids[b], bounds[b][1] - bounds[b][0], n_tokens, func),
                            (tuple(b - a for a, b in bounds), (n_tokens,)), np.float32)
    return xr.DataArray(values, dims=("prompt", "token"))
