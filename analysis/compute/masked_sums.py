"""Sums of residual vectors over chosen positions, streamed a run of prompt chunks at a time.

The mean difference of a pair over a set of positions is the difference of its two passes'
sums over those positions divided by their count, so one pass over the store yields every
pair's means: each task reads the regions of one run of prompt chunks
(:mod:`analysis.compute.regions`, straight from the chunk files where it can), adds up each pass's
vectors at the positions each mask keeps, and returns a few (pass, mask, layer, dim) sums;
the sums of all tasks are added in a tree. Memory follows the run size, never the store:
no (prompt, token, dim) array is ever assembled.

Axes legend: s = pass, m = mask (a set of positions), p = prompt, l = layer, t = token,
d = dim. Sums are accumulated in float64.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from analysis.compute.dim_sums import kept_sums
from analysis.compute.ragged_sums import LAYOUT, RUN_BYTES
from analysis.compute.regions import materialize, prompt_runs, region, summed_over_runs, token_slab
from analysis.geometry.outliers import peak_ratios
from store.reader import direct_regions


def applies(ds: xr.Dataset) -> bool:
    """True for a store's ``resid`` in its own layout, Dask-backed (as :func:`store.reader.open_store` gives it)."""
    return "resid" in ds and ds.resid.dims == LAYOUT and isinstance(ds.resid.data, da.Array)


def _drop_massive(out: np.ndarray, sumsq_splt: np.ndarray, keep_mpt: np.ndarray, first, layers: np.ndarray,
                  factor: float) -> None:
    """Take the massive positions of one prompt chunk (:func:`analysis.geometry.outliers.peak_ratios` of its sums of
    squares, all its tokens read) back out of ``out``: each is read again, alone (they are a few per prompt)."""
    massive_pt = peak_ratios(sumsq_splt.transpose(1, 0, 2, 3)) > factor
    found = massive_pt & keep_mpt.any(axis=0)
    for p, t in zip(*np.nonzero(found), strict=True):
        index = list(first.index)
        index[1], index[3] = slice(index[1].start + p, index[1].start + p + 1), slice(t, t + 1)
        for s in range(out.shape[0]):
            index[0] = slice(s, s + 1)
            x = first.source.read(tuple(index))[0]  # (1, l, 1, d)
            out[s, :, :, :-1] -= kept_sums(x, keep_mpt[:, p:p + 1, t:t + 1], layers)
        out[:, :, :, -1] -= keep_mpt[:, p, t][None, :, None]


def _run_sums(chunks: list, n_shape: tuple, layers: np.ndarray, factor: float | None) -> np.ndarray:
    """The (s, m, l, d + 1) sums of a run (the last column: the positions counted), a prompt chunk at a time;
    with ``factor``, without the chunk's massive positions, found from the same reads."""
    out = np.zeros(n_shape)
    for extent, pieces in chunks:
        sumsq = None
        for tokens, reads, keep_mpt in pieces:
            for s, read in enumerate(reads):
                x = materialize(read)[0]  # (p, l, t, d)
                if factor is None:
                    out[s, :, :, :-1] += kept_sums(x, keep_mpt, layers)
                    continue
                sums, squares = kept_sums(x, keep_mpt, layers, sumsq=True)  # one pass: sums and norms
                out[s, :, :, :-1] += sums
                if sumsq is None:
                    sumsq = np.full((len(reads), *x.shape[:2], extent), np.nan)
                sumsq[s, ..., tokens] = squares
            out[:, :, :, -1] += keep_mpt.sum(axis=(1, 2))[None, :, None]
        if factor is not None and pieces:
            keep = np.concatenate([keep for _, _, keep in pieces], axis=-1)
            _drop_massive(out, sumsq, keep, pieces[0][1][0], layers, factor)
    return out


def masked_sums(ds: xr.Dataset, keep_mpt: np.ndarray, layers: list[int] | None = None,
                massive_factor: float | None = None) -> xr.Dataset:
    """``sum`` (pass_, mask, layer, dim): the float64 sum of each pass's residuals over the positions each mask
    keeps, and ``count`` (mask): how many positions it kept.

    ``keep_mpt`` is a boolean (mask, prompt, token) array over the store's rows; positions it keeps
    past a prompt's real tokens are ignored. ``layers`` (store layer labels) restricts the sums.
    ``massive_factor`` also leaves out the massive-activation positions
    (:func:`analysis.geometry.outliers.massive_positions` with that factor), found while reading (a position's
    ratio is to its own prompt's median): one pass over the store where finding them first took two.
    Lazy: one task per run of prompt chunks, whose result is the (pass, mask, layer, dim) sums, added in
    a tree.
    """
    resid = ds.resid
    direct = direct_regions(resid) is not None
    if massive_factor is not None and not direct:  # the positions to take out are read again: direct reads only
        from analysis.geometry.outliers import massive_positions

        keep_mpt = keep_mpt & ~np.asarray(massive_positions(ds, massive_factor).massive.values)[None]
        massive_factor = None
    chosen = np.arange(ds.sizes["layer"]) if layers is None else \
        np.array([list(ds.layer.values).index(la) for la in layers], dtype=np.int64)
    if massive_factor is None and layers is not None and not direct:  # assemble the chosen layers only
        # (read straight from the files, a chunk holds every layer: the sums take the chosen ones)
        resid, chosen = resid.sel(layer=list(layers)), np.arange(len(layers))
    n_pass, _, n_layer, n_tokens, n_dim = resid.shape
    chunks, itemsize = resid.data.chunks, resid.dtype.itemsize
    n_tokens_p = np.asarray(ds.n_tokens.values)
    real_pt = np.arange(n_tokens)[None, :] < n_tokens_p[:, None]
    keep_mpt = np.asarray(keep_mpt, dtype=bool) & real_pt[None]
    cell = n_pass * n_layer * n_dim * itemsize
    name = "masked-sums-" + tokenize(resid.data.name, keep_mpt, n_tokens_p, chosen, massive_factor)
    shape = (n_pass, keep_mpt.shape[0], len(chosen), n_dim + 1)
    tasks = []
    for run in prompt_runs(n_tokens_p, chunks[1][0], chunks[3][0], n_tokens, cell, RUN_BYTES):
        work = []
        for rows, extent in zip(run.chunk_rows, run.extents, strict=True):
            slab = token_slab(rows.stop - rows.start, n_layer * n_dim, itemsize, chunks[3][0], extent, direct)
            pieces = []
            stop = extent
            if massive_factor is None:  # read up to the token chunk of the last kept position (e.g. the first k)
                kept_t = np.flatnonzero(keep_mpt[:, rows, :extent].any(axis=(0, 1)))
                stop = min(extent, -(-(int(kept_t[-1]) + 1) // chunks[3][0]) * chunks[3][0]) if kept_t.size else 0
            for start in range(0, stop, slab):
                tokens = slice(start, min(stop, start + slab))
                keep = keep_mpt[:, rows, tokens]
                if keep.any() or massive_factor is not None:  # every real token counts in a prompt's median
                    pieces.append([tokens, [region(resid, {"pass_": slice(s, s + 1), "prompt": rows,
                                                           "token": tokens}) for s in range(n_pass)], keep])
            work.append((extent, pieces))
        tasks.append((_run_sums, work, shape, chosen, massive_factor))
    sums = summed_over_runs(name, tasks, shape, [] if direct else [resid.data])
    return xr.Dataset({"sum": (("pass_", "mask", "layer", "dim"), sums[..., :-1]),
                       "count": ("mask", sums[0, :, 0, -1])},
                      coords={"pass_": ds.pass_.values, "layer": resid.layer.values[chosen]})
