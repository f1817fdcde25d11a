"""Sums of residual vectors over chosen positions, streamed a run of prompt chunks at a time.

The mean difference of a pair over a set of positions is the difference of its two passes'
sums over those positions divided by their count, so one pass over the store yields every
pair's means: each task reads the regions of one run of prompt chunks
(:mod:`analysis.regions`, straight from the chunk files where it can), adds up each pass's
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

from analysis.ragged_sums import LAYOUT, RUN_BYTES
from analysis.regions import materialize, prompt_runs, region, summed_over_runs, token_slab
from store.reader import direct_regions


def applies(ds: xr.Dataset) -> bool:
    """True for a store's ``resid`` in its own layout, Dask-backed (as :func:`store.reader.open_store` gives it)."""
    return "resid" in ds and ds.resid.dims == LAYOUT and isinstance(ds.resid.data, da.Array)


def _piece_sums(reads: list, keep_mpt: np.ndarray, n_layer: int) -> np.ndarray:
    """(s, m, l, d) sums of one piece: each pass's vectors at the positions each mask keeps."""
    passes = [materialize(read) for read in reads]  # each (1, p, l, t, d)
    n_mask, n_dim = keep_mpt.shape[0], passes[0].shape[-1]
    out = np.zeros((len(passes), n_mask, n_layer, n_dim))
    for m in range(n_mask):
        if not keep_mpt[m].any():
            continue
        for s, x in enumerate(passes):
            for la in range(n_layer):
                # boolean indexing picks (n, d) rows: padding (NaN) is never touched
                out[s, m, la] = x[0, :, la][keep_mpt[m]].astype(np.float64).sum(axis=0)
    return out


def _run_sums(pieces: list, n_shape: tuple) -> np.ndarray:
    out = np.zeros(n_shape)
    for reads, keep_mpt in pieces:
        out += _piece_sums(reads, keep_mpt, n_shape[2])
    return out


def masked_sums(ds: xr.Dataset, keep_mpt: np.ndarray, layers: list[int] | None = None) -> xr.DataArray:
    """(pass_, mask, layer, dim): the float64 sum of each pass's residuals over the positions each mask keeps.

    ``keep_mpt`` is a boolean (mask, prompt, token) array over the store's rows; positions it keeps
    past a prompt's real tokens are ignored. ``layers`` (store layer labels) restricts the read. Lazy:
    one task per run of prompt chunks, whose result is the (pass, mask, layer, dim) sums, added in a tree.
    """
    resid = ds.resid
    if layers is not None:
        resid = resid.sel(layer=list(layers))
    n_pass, _, n_layer, n_tokens, n_dim = resid.shape
    chunks, itemsize = resid.data.chunks, resid.dtype.itemsize
    n_tokens_p = np.asarray(ds.n_tokens.values)
    real_pt = np.arange(n_tokens)[None, :] < n_tokens_p[:, None]
    keep_mpt = np.asarray(keep_mpt, dtype=bool) & real_pt[None]
    direct = direct_regions(resid) is not None
    cell = n_pass * n_layer * n_dim * itemsize
    name = "masked-sums-" + tokenize(resid.data.name, keep_mpt, n_tokens_p)
    shape = (n_pass, keep_mpt.shape[0], n_layer, n_dim)
    tasks = []
    for run in prompt_runs(n_tokens_p, chunks[1][0], chunks[3][0], n_tokens, cell, RUN_BYTES):
        pieces = []
        for rows, extent in zip(run.chunk_rows, run.extents, strict=True):
            slab = token_slab(rows.stop - rows.start, n_layer * n_dim, itemsize, chunks[3][0], extent, direct)
            for start in range(0, extent, slab):
                tokens = slice(start, min(extent, start + slab))
                keep = keep_mpt[:, rows, tokens]
                if keep.any():
                    pieces.append([[region(resid, {"pass_": slice(s, s + 1), "prompt": rows, "token": tokens})
                                    for s in range(n_pass)], keep])
        tasks.append((_run_sums, pieces, shape))
    sums = summed_over_runs(name, tasks, shape, [] if direct else [resid.data])
    return xr.DataArray(sums, dims=("pass_", "mask", "layer", "dim"),
                        coords={"pass_": ds.pass_.values, "layer": resid.layer.values})
