"""Reductions of the lens statistics at one layer, streamed a run of prompt chunks at a time.

A statistics variable of a ragged store has a chunk per (pass or pair, lens, prompt chunk, token chunk):
hundreds of thousands on a store of a thousand prompts, and an xarray expression over one of them (select a
lens, a layer, compare top-k ids across passes) builds a graph layer of that many tasks per step, which took
minutes and gigabytes before reading anything. Here a task reads the real regions of a run of prompt chunks
straight from the chunk files (``store.reader.ArrayRegions``), reduces them to a few numbers, and the runs'
numbers are added: as many tasks as runs. Used for the shift rate and the mean KL at the last layer with
statistics (``report``'s summary). Stores that are not local fall back to the xarray expressions.

Axes legend: s = pass, q = pair, r = store row (prompt) of a run, t = token, k = top-k rank.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from dask.base import tokenize

from analysis.compute.regions import materialize, prompt_runs, read_later, stacked_over_runs
from store.chunking import TARGET_CHUNK_BYTES
from store.reader import ArrayRegions, direct_regions
from store.schema import lens_layers


def _local_path(ds: xr.Dataset):
    for name in ("kl", "entropy", "resid"):
        if name in ds and (source := direct_regions(ds[name])) is not None:
            return source.path
    return None


def applies(ds: xr.Dataset) -> bool:
    """True for a local store as ``open_store`` gave it (its statistics can be read region by region)."""
    return _local_path(ds) is not None and "lens_done" in ds


def regions(ds: xr.Dataset, name: str) -> ArrayRegions | None:
    """Region reads of the statistics variable ``name`` straight from a local store's files (ids included, which
    ``open_store`` gives none), when :func:`applies`; None otherwise."""
    return ArrayRegions(_local_path(ds), name) if applies(ds) and name in ds else None


def _real_rt(n_tokens_r: np.ndarray, done_r: np.ndarray, extent: int) -> np.ndarray:
    return (np.arange(extent)[None, :] < n_tokens_r[:, None]) & done_r[:, None]


def _run_counts(pieces: list, pairs: list[tuple[int, int]], kl_pairs: list[int]) -> np.ndarray:
    """(count, rows of the run): [shifted per pair..., KL sum per kl pair..., real positions] per prompt."""
    first = pieces[0][3].start
    out = np.zeros((len(pairs) + len(kl_pairs) + 1, pieces[-1][3].stop - first))
    for top, kl, real_rt, rows in pieces:
        rows = slice(rows.start - first, rows.stop - first)
        top_srtk = materialize(top)[:, 0, :, 0] if top is not None else None  # (pass, rows, tokens, 3)
        for q, (left, right) in enumerate(pairs):
            same = (top_srtk[left] == top_srtk[right][..., :1]).any(axis=-1)
            out[q, rows] += np.count_nonzero(~same & real_rt, axis=-1)
        if kl is not None:
            kl_qrt = materialize(kl)[:, 0, :, 0]  # (pair, rows, tokens)
            for i, q in enumerate(kl_pairs):
                out[len(pairs) + i, rows] += np.where(real_rt, kl_qrt[q], 0.0).sum(axis=-1)
        out[-1, rows] += np.count_nonzero(real_rt, axis=-1)
    return out


def last_layer_counts(ds: xr.Dataset, pairs: list[tuple[str, str]], kl_pairs: list[str],
                      lens: str = "norm") -> xr.DataArray:
    """Lazily, per prompt (``count``, ``prompt``), at the last layer with statistics and under ``lens``: for each
    (left, right) of ``pairs`` the real positions whose right top-1 token is not in the left top-3, for each name
    of ``kl_pairs`` the sum of its KL over real positions, and the number of real positions (0 for prompts whose
    statistics are not done): the per-prompt sums a bootstrap over prompts resamples."""
    path = _local_path(ds)
    passes, stored_pairs = [str(p) for p in ds.pass_.values], [str(q) for q in ds.pair.values]
    lens_i = [str(x) for x in ds.lens.values].index(lens)
    layer_i = [int(la) for la in ds.layer.values].index(lens_layers(ds)[-1])
    top = ArrayRegions(path, "topk_id")
    kl = ArrayRegions(path, "kl") if kl_pairs else None
    index = [(passes.index(a), passes.index(b)) for a, b in pairs]
    kl_index = [stored_pairs.index(q) for q in kl_pairs]
    n_tokens = np.asarray(ds.n_tokens.values)
    done = np.asarray(ds.lens_done.values, dtype=bool)
    chunks = ds.topk_id.data.chunks  # (pass, lens, prompt, layer, token, k)
    # what a (prompt, token) cell costs to read: its whole chunks, every lens, layer and k in them (a run per
    # store chunk's worth of those, not of the three ids it keeps: one run, one thread, took 2.5 s)
    cell = len(passes) * chunks[1][0] * chunks[3][0] * chunks[5][0] * ds.topk_id.dtype.itemsize
    name = "last-layer-counts-" + tokenize(path, pairs, kl_pairs, lens, n_tokens, done)
    tasks, runs = [], []
    for run in prompt_runs(n_tokens, chunks[2][0], chunks[4][0], ds.sizes["token"], cell, TARGET_CHUNK_BYTES):
        pieces = []
        for rows, extent in zip(run.chunk_rows, run.extents, strict=True):
            where = (slice(lens_i, lens_i + 1), rows, slice(layer_i, layer_i + 1), slice(0, extent))
            top_region = read_later(top, (slice(None), *where, slice(0, 3))) if pairs else None  # KL alone
            kl_region = read_later(kl, (slice(None), *where)) if kl is not None else None
            pieces.append([top_region, kl_region, _real_rt(n_tokens[rows], done[rows], extent), rows])
        tasks.append((_run_counts, pieces, index, kl_index))
        runs.append(run.rows)
    counts = stacked_over_runs(name, tasks, runs, (len(pairs) + len(kl_pairs) + 1,), ())
    return xr.DataArray(counts, dims=("count", "prompt"), coords={"prompt": ds.prompt.values})


def _run_layer_sums(pieces: list, n_lead: int, n_layer: int) -> np.ndarray:
    """(lead + 1, rows of the run, layer): per prompt, the sums over its real positions of each pair (or pass)
    and, in the last row of the first axis, the count of real positions."""
    n_rows = sum(rows.stop - rows.start for _, rows, _ in pieces)
    out = np.zeros((n_lead + 1, n_rows, n_layer))
    start = pieces[0][1].start
    for region, rows, real_rt in pieces:
        values_qrlt = materialize(region)[:, 0]  # (pair, rows, layers, tokens)
        at = slice(rows.start - start, rows.stop - start)
        out[:-1, at] = np.where(real_rt[None, :, None, :], values_qrlt, 0.0).sum(axis=3)
        out[-1, at] = np.count_nonzero(real_rt, axis=-1)[:, None]
    return out


def _statistic_runs(ds: xr.Dataset, name: str, lens: str, lead: slice) -> tuple[list[int], list[list[tuple]]]:
    """The reads of statistic ``name`` under ``lens`` at ``lead`` (a slice of its first axis), over every layer
    between the first and last with statistics (one read covers them; the layers between are dropped after),
    grouped in runs of prompt chunks of about a store chunk's bytes: (the kept layers' indices, the runs), each
    run a list of (region, store rows, real positions (rows, tokens) of prompts whose statistics are done)."""
    var = ds[name]
    lens_i = [str(x) for x in ds.lens.values].index(lens)
    stored = [int(la) for la in ds.layer.values]
    kept = [stored.index(la) for la in lens_layers(ds)]
    layers = slice(kept[0], kept[-1] + 1)
    source = ArrayRegions(_local_path(ds), name)
    n_tokens, done = np.asarray(ds.n_tokens.values), np.asarray(ds.lens_done.values, dtype=bool)
    chunks = var.data.chunks  # (lead, lens, prompt, layer, token)
    cell = len(range(*lead.indices(var.shape[0]))) * 4 * (layers.stop - layers.start)  # float32 per (row, token)
    runs = [[(read_later(source, (lead, slice(lens_i, lens_i + 1), rows, layers, slice(0, extent))), rows,
              _real_rt(n_tokens[rows], done[rows], extent))
             for rows, extent in zip(run.chunk_rows, run.extents, strict=True)]
            for run in prompt_runs(n_tokens, chunks[2][0], chunks[4][0], ds.sizes["token"], cell, TARGET_CHUNK_BYTES)]
    return kept, runs


def layer_sums(ds: xr.Dataset, name: str = "kl", lens: str = "norm") -> xr.Dataset:
    """Per prompt, ``sum`` ((pair or pass_), prompt, layer) of a per-position statistic over its real positions
    and their ``count`` (prompt, layer; 0 for a prompt whose statistics are not done), at each layer with
    statistics, a task per run of prompt chunks: the per-prompt sums of a mean and of its bootstrap. Lazy."""
    var = ds[name]
    lead = var.dims[0]
    stored = [int(la) for la in ds.layer.values]
    kept, runs = _statistic_runs(ds, name, lens, slice(None))
    token = "layer-sums-" + tokenize(_local_path(ds), name, lens, np.asarray(ds.n_tokens.values),
                                     np.asarray(ds.lens_done.values, dtype=bool), kept)
    n_layer = kept[-1] - kept[0] + 1
    tasks = [(_run_layer_sums, [list(piece) for piece in run], var.sizes[lead], n_layer) for run in runs]
    rows = [slice(run[0][1].start, run[-1][1].stop) for run in runs]
    sums = stacked_over_runs(token, tasks, rows, (var.sizes[lead] + 1,), (n_layer,))
    offsets = [k - kept[0] for k in kept]
    coords = {"prompt": ds.prompt.values, "layer": [stored[k] for k in kept]}
    return xr.Dataset({"sum": xr.DataArray(sums[:-1][:, :, offsets], dims=(lead, "prompt", "layer"),
                                           coords={lead: ds[lead].values, **coords}),
                       "count": xr.DataArray(sums[-1][:, offsets], dims=("prompt", "layer"), coords=coords)})


def layer_means(ds: xr.Dataset, name: str = "kl", lens: str = "norm") -> xr.DataArray:
    """(pair or pass_, layer): the mean of a per-position statistic over real positions (prompts whose
    statistics are done) at each layer with statistics, from :func:`layer_sums`. Lazy."""
    sums = layer_sums(ds, name, lens).sum("prompt")
    return (sums["sum"] / sums["count"]).rename(name)


def _run_top(pieces: list, top: int) -> np.ndarray:
    """(value, row, layer, token) of the ``top`` largest kept values of one run, as rows of a float array."""
    from analysis.compute.by_position import top_by_magnitude

    found = []
    for region, rows_start, kept_rt, layer_start in pieces:
        values_rlt = materialize(region)[0, 0]  # (rows, layers, tokens)
        values_rlt = np.where(kept_rt[:, None, :], values_rlt, np.nan)
        picked, flat = top_by_magnitude(values_rlt.reshape(1, -1), top)
        for value, index in zip(picked[0], flat[0], strict=True):
            if index >= 0:
                r, la, t = np.unravel_index(index, values_rlt.shape)
                found.append((value, rows_start + r, layer_start + la, t))
    return np.asarray(found, dtype=np.float64).reshape(-1, 4)


def largest(ds: xr.Dataset, label: str, name: str = "kl", lens: str = "norm", top: int = 8,
            keep_pt: np.ndarray | None = None) -> np.ndarray:
    """The ``top`` positions with the largest |value| of a statistic (``name`` at ``label`` of its lead axis,
    under ``lens``) over the real positions of the layers with statistics that ``keep_pt`` (store row x token;
    None: all) keeps, read a run of prompt chunks at a time: rows of (value, store row, layer index, token),
    largest first, ties to the earliest position (as :func:`analysis.compute.reductions.hotspots` orders them)."""
    import dask

    var = ds[name]
    lead_i = [str(x) for x in var[var.dims[0]].values].index(label)
    kept, runs = _statistic_runs(ds, name, lens, slice(lead_i, lead_i + 1))
    keep_pt = np.ones((ds.sizes["prompt"], ds.sizes["token"]), bool) if keep_pt is None else np.asarray(keep_pt, bool)
    tasks = [dask.delayed(_run_top)([[region, rows.start, real_rt & keep_pt[rows, :real_rt.shape[1]], kept[0]]
                                     for region, rows, real_rt in run], top) for run in runs]
    found = np.concatenate([np.zeros((0, 4)), *dask.compute(*tasks)])
    flat = (found[:, 1] * ds.sizes["layer"] + found[:, 2]) * ds.sizes["token"] + found[:, 3]
    order = np.lexsort((flat, -np.abs(found[:, 0])))
    return found[order[:top]]
