"""Lazy reductions over positions: hotspots, correlations, seven-number summaries.

Inputs are metrics shaped (..., prompt, layer, token) such as those of
:mod:`analysis.geometry.metrics`; padding is NaN and never counts. Results are Dask-backed
and computed only when asked.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import xarray as xr
from numba import njit

from analysis.compute import by_position
from analysis.compute.by_position import MOMENTS, top_by_magnitude
from analysis.compute.positions import cut_padding_tokens
from store.errors import UsageError

POSITION = ("prompt", "layer", "token")


def _top_in_prompt(values_lt: np.ndarray, keep_t: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    # (..., layer, token) -> the n largest |values| of each prompt at the tokens keep_t (..., token) keeps, and
    # their flat (layer, token) index.
    n_tokens = values_lt.shape[-1]
    cut = cut_padding_tokens(values_lt)
    kept = np.broadcast_to(keep_t, (*values_lt.shape[:-2], n_tokens))[..., None, :cut.shape[-1]]
    cut = np.where(kept, cut, np.nan)
    picked, index = top_by_magnitude(cut.reshape(*cut.shape[:-2], -1), n)
    if cut.shape[-1] < n_tokens:  # back to indices of the whole token axis
        index = np.where(index >= 0, index // cut.shape[-1] * n_tokens + index % cut.shape[-1], -1)
    want = min(n, values_lt.shape[-2] * n_tokens)
    if picked.shape[-1] < want:  # fewer cells than n once cut: the rest is padding
        fill = want - picked.shape[-1]
        picked = np.concatenate([picked, np.full((*picked.shape[:-1], fill), np.nan, picked.dtype)], axis=-1)
        index = np.concatenate([index, np.full((*index.shape[:-1], fill), -1, index.dtype)], axis=-1)
    return picked, index


def _top_of_prompts(values_pk: np.ndarray, index_pk: np.ndarray, n: int, per_prompt: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    # (..., prompt, k) candidates -> the n largest overall and their flat (prompt, layer, token) index.
    flat = (np.arange(values_pk.shape[-2])[:, None] * per_prompt + index_pk).reshape(*index_pk.shape[:-2], -1)
    picked, where = top_by_magnitude(values_pk.reshape(*values_pk.shape[:-2], -1), n)
    return picked, np.where(where >= 0, np.take_along_axis(flat, np.maximum(where, 0), axis=-1), -1)


def hotspots(metric: xr.DataArray, top_n: int = 5, where: xr.DataArray | None = None) -> xr.Dataset:
    """The ``top_n`` positions with the largest |value|, per leading label (e.g. per pair), among those that
    ``where`` (prompt, token; None: all) keeps, lazily.

    Returns ``value``, ``prompt``, ``layer`` and ``token`` along a new ``rank`` dimension
    (-1 and NaN where fewer real positions exist). Token strings: ``ds.token_str``
    at (prompt, token). Found in two steps, each prompt's ``top_n`` and then the best of
    those, so no step holds more than a block of prompts.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import hotspots, open_store, pair_metrics
    >>> ds = open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))
    >>> spots = hotspots(pair_metrics(ds, names=["norm_diff"]).norm_diff, top_n=3).compute()
    >>> spots.value.dims, bool((spots.value.diff("rank") <= 0).all())
    (('pair', 'rank'), True)
    """
    if top_n < 1:
        raise UsageError(f"--top-n must be at least 1, got {top_n}")
    if by_position.applies(metric):  # a metric over real positions only: the same answer, a block per run
        metric, where = split_where(metric, where)
        n_prompts, n_tokens = int(metric.row.max()) + 1, by_position.token_slots(metric)
        per_prompt = min(top_n, metric.sizes["layer"] * n_tokens)
        return by_position.largest(metric, top_n, n_prompts, n_tokens, where, min(top_n, n_prompts * per_prompt))
    missing = [d for d in POSITION if d not in metric.dims]
    if missing:
        raise UsageError(f"hotspots need a metric over {', '.join(POSITION)}; it lacks {', '.join(missing)}")
    metric, where = split_where(metric, where)
    shape = [metric.sizes[d] for d in POSITION]
    # Labels of positions (texts, token strings...) are not needed to rank, and carrying them costs seconds.
    labels = [name for name, coord in metric.coords.items() if set(coord.dims) & set(POSITION)]
    values = metric.drop_vars(labels).astype("float32").transpose(..., *POSITION)
    lazy = values.chunks is not None
    per_prompt = min(top_n, shape[1] * shape[2])
    keep = _keep_pt(values, where)
    if lazy:
        keep = keep.chunk({"prompt": values.chunks[values.dims.index("prompt")], "token": -1})
    top_v, top_i = xr.apply_ufunc(
        _top_in_prompt, values.chunk({"layer": -1, "token": -1}) if lazy else values, keep, kwargs={"n": top_n},
        input_core_dims=[["layer", "token"], ["token"]], output_core_dims=[["k"], ["k"]], dask="parallelized",
        output_dtypes=[np.float32, np.int64], dask_gufunc_kwargs={"output_sizes": {"k": per_prompt}})
    if lazy:
        top_v, top_i = top_v.chunk({"prompt": -1}), top_i.chunk({"prompt": -1})
    value, index = xr.apply_ufunc(
        _top_of_prompts, top_v, top_i, kwargs={"n": top_n, "per_prompt": shape[1] * shape[2]},
        input_core_dims=[["prompt", "k"], ["prompt", "k"]], output_core_dims=[["rank"], ["rank"]],
        dask="parallelized", output_dtypes=[np.float32, np.int64],
        dask_gufunc_kwargs={"output_sizes": {"rank": min(top_n, shape[0] * per_prompt)}})
    prompt, layer, token = index // (shape[1] * shape[2]), (index // shape[2]) % shape[1], index % shape[2]
    valid = index >= 0
    coords = {"prompt": prompt, "layer": layer, "token": token}
    return xr.Dataset({"value": value, **{k: v.where(valid, -1) for k, v in coords.items()}}).assign_coords(
        rank=np.arange(value.sizes["rank"]))


def correlation(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """Pearson r of two metrics over the positions where both are finite (per leading label), lazily."""
    dims = [d for d in POSITION if d in a.dims and d in b.dims]
    return xr.corr(a.astype("float64"), b.astype("float64"), dim=dims)


def seven_number_summary(metric: xr.DataArray, n_tokens: np.ndarray | None = None,
                         where: xr.DataArray | None = None) -> xr.Dataset:
    """min, q1, median, q3, max, mean and std (population) across prompts of each prompt's mean metric.

    Each prompt is first reduced to the mean of its real cells (``n_tokens`` per prompt, by default the
    metric's own coordinate) that ``where`` (prompt, token; None: all) keeps and that are not NaN, as the
    legacy summary-stats files did per record (a task per block of prompts, touching its real tokens only);
    quartiles are the inclusive (linear) ones.
    """
    if all(d in metric.dims for d in POSITION) or by_position.applies(metric):
        metric, where = split_where(metric, where)
        moments = prompt_moments(metric, real_lengths(metric, n_tokens), where, full=False).sum("layer")
        count = moments.sel(moment="count", drop=True)
        per_prompt = moments.sel(moment="sum", drop=True) / count.where(count > 0)
    else:
        kept = metric if where is None else metric.where(where)
        per_prompt = kept.astype("float64").mean([d for d in ("layer", "token") if d in metric.dims], skipna=True)
    per_prompt = per_prompt.chunk({"prompt": -1}) if per_prompt.chunks else per_prompt
    quartiles = per_prompt.quantile([0.25, 0.5, 0.75], dim="prompt", method="linear", skipna=True)
    return xr.Dataset({
        "min": per_prompt.min("prompt"), "q1": quartiles.sel(quantile=0.25, drop=True),
        "median": quartiles.sel(quantile=0.5, drop=True), "q3": quartiles.sel(quantile=0.75, drop=True),
        "max": per_prompt.max("prompt"), "mean": per_prompt.mean("prompt"), "std": per_prompt.std("prompt"),
    })


def split_where(metric: xr.DataArray, where: xr.DataArray | None) -> tuple[xr.DataArray, xr.DataArray | None]:
    """(metric, mask) for the per-block reductions, which take a (prompt, token) mask: a mask over more axes
    (e.g. per ``model_pair`` of :func:`analysis.open_stores`) is applied to the metric instead."""
    if where is None or set(where.dims) == {"prompt", "token"}:
        return metric, where
    return metric.where(where), None


def _keep_pt(x: xr.DataArray, where: xr.DataArray | None) -> xr.DataArray:
    """The (prompt, token) mask of the per-block reductions, without labels (positions match ``x``'s)."""
    if where is None:
        return xr.DataArray(np.ones((x.sizes["prompt"], x.sizes["token"]), bool), dims=("prompt", "token"))
    return where.drop_vars(list(where.coords)).transpose("prompt", "token")


def real_lengths(metric: xr.DataArray, n_tokens: np.ndarray | None = None) -> np.ndarray:
    """Each prompt's real tokens: ``n_tokens``, else the metric's ``n_tokens`` coordinate, else every token
    (NaN still marks padding then; only the work is not cut to the real tokens)."""
    if n_tokens is not None:
        return np.asarray(n_tokens)
    if "n_tokens" in metric.coords and metric.n_tokens.dims == ("prompt",):
        return np.asarray(metric.n_tokens.values)
    return np.full(metric.sizes["prompt"], metric.sizes["token"])




@njit(cache=True, nogil=True)
def _moments_kernel(x_aplt, keep_pt, n_tokens_p, over_token, full, out_mapk):  # pragma: no cover - compiled
    # One pass for count, sum, min and max, a second for the centred sum of squares; k is the kept axis.
    n_a, n_p, n_l, n_t = x_aplt.shape
    for a in range(n_a):
        for p in range(n_p):
            extent = min(n_tokens_p[p], n_t)
            n_k = n_l if over_token else n_t
            for k in range(n_k):
                count, total, low, high = 0.0, 0.0, np.inf, -np.inf
                n_j = extent if over_token else (n_l if k < extent and keep_pt[p, k] else 0)
                for j in range(n_j):
                    if over_token and not keep_pt[p, j]:
                        continue
                    v = np.float64(x_aplt[a, p, k, j] if over_token else x_aplt[a, p, j, k])
                    if v == v:
                        count += 1.0
                        total += v
                        low, high = min(low, v), max(high, v)
                out_mapk[0, a, p, k], out_mapk[1, a, p, k] = count, total
                if full:
                    mean, m2 = total / count if count > 0 else np.nan, 0.0
                    for j in range(n_j):
                        if over_token and not keep_pt[p, j]:
                            continue
                        v = np.float64(x_aplt[a, p, k, j] if over_token else x_aplt[a, p, j, k])
                        if v == v:
                            m2 += (v - mean) ** 2
                    out_mapk[2, a, p, k], out_mapk[3, a, p, k], out_mapk[4, a, p, k] = m2, low, high


def _prompt_moments(x_plt: np.ndarray, keep_pt: np.ndarray, n_tokens_p: np.ndarray, over: str = "token",
                    full: bool = True) -> np.ndarray:
    # (..., prompt, layer, token) -> (moment, ..., prompt, layer) reduced over the real kept tokens that are not
    # NaN (over="token"), or (moment, ..., prompt, token) over the layers (over="layer"); the moments are
    # MOMENTS (full) or count and sum. Only the real tokens are touched, in one compiled loop (the numpy form
    # made ten float64 passes over the block's padded layout).
    lead = x_plt.shape[:-3]
    x_aplt = x_plt.reshape(-1, *x_plt.shape[-3:])
    kept = x_plt.shape[-2] if over == "token" else x_plt.shape[-1]
    out = np.zeros((len(MOMENTS) if full else 2, x_aplt.shape[0], x_plt.shape[-3], kept))
    _moments_kernel(x_aplt, np.ascontiguousarray(keep_pt, dtype=np.bool_), np.asarray(n_tokens_p, np.int64),
                    over == "token", full, out)
    return out.reshape(out.shape[0], *lead, *out.shape[2:])


def prompt_moments(x: xr.DataArray, n_tokens: np.ndarray, where: xr.DataArray | None = None, over: str = "token",
                   full: bool = True) -> xr.DataArray:
    """Per prompt, partial moments (``moment``: :data:`MOMENTS`, or count and sum unless ``full``) of ``x``
    (..., prompt, layer, token) over ``over`` (``token``: per layer; ``layer``: per token) at the real positions
    that ``where`` (prompt, token; None: all) keeps and where ``x`` is not NaN. A task per block of prompts
    touches its real tokens only (on a ragged store a small share of the padded layout). Lazy when ``x`` is."""
    if by_position.applies(x):
        return by_position.moments(x, len(n_tokens), by_position.token_slots(x), where, over, full)
    x = x.transpose(..., "prompt", "layer", "token")
    keep = _keep_pt(x, where)
    kwargs = {"over": over, "full": full}
    n_moments = len(MOMENTS) if full else 2
    if x.chunks is None:
        per_prompt = _prompt_moments(x.values, np.asarray(keep.values, bool), np.asarray(n_tokens), **kwargs)
    else:
        import dask.array as da

        # whole token rows (a block's real tokens start at 0); whole layers only where they are reduced
        data = x.data.rechunk({x.ndim - 1: -1, **({x.ndim - 2: -1} if over == "layer" else {})})
        prompt_chunks = data.chunks[x.ndim - 3]
        keep_data = (keep.data if keep.chunks is not None else da.from_array(np.asarray(keep.values, bool)))
        keep_data = keep_data.rechunk((prompt_chunks, -1))
        n_data = da.from_array(np.asarray(n_tokens), chunks=(prompt_chunks,))
        lead = "abcdefgh"[:x.ndim - 3]
        kept = "l" if over == "token" else "t"
        per_prompt = da.blockwise(partial(_prompt_moments, **kwargs), "s" + lead + "p" + kept, data,
                                  lead + "plt", keep_data, "pt", n_data, "p", new_axes={"s": n_moments},
                                  dtype=np.float64, concatenate=True, meta=np.empty((0,) * x.ndim, np.float64))
    dims = (*x.dims[:-2], "layer" if over == "token" else "token")
    coords = {d: x[d] for d in dims if d in x.coords}
    return xr.DataArray(per_prompt, dims=("moment", *dims), coords=coords).assign_coords(
        moment=list(MOMENTS[:n_moments]))


def combine_moments(moments: xr.DataArray, dim: str = "prompt") -> xr.Dataset:
    """``mean``, ``std`` (population), ``min`` and ``max`` from :func:`prompt_moments`'s partials, combined over
    ``dim`` (the pairwise update of the centred sums: no cancellation); NaN where no position counts."""
    count, total = moments.sel(moment="count", drop=True), moments.sel(moment="sum", drop=True)
    n = count.sum(dim)
    mean = total.sum(dim) / n.where(n > 0)
    part_mean = total / count.where(count > 0)
    m2 = moments.sel(moment="m2", drop=True).sum(dim) + (count * (part_mean - mean) ** 2).fillna(0).sum(dim)
    low, high = moments.sel(moment="min", drop=True).min(dim), moments.sel(moment="max", drop=True).max(dim)
    return xr.Dataset({"mean": mean, "std": np.sqrt(m2 / n.where(n > 0)), "min": low.where(n > 0),
                       "max": high.where(n > 0)})


def _position_totals(x: xr.DataArray, n_tokens: np.ndarray, where: xr.DataArray | None
                     ) -> tuple[xr.DataArray, xr.DataArray]:
    """(sum, count) over ``prompt`` and ``token`` of :func:`position_sum`'s positions, from one pass."""
    if where is not None and set(where.dims) != {"prompt", "token"}:  # e.g. per model_pair: the plain way
        x = x.transpose(..., "prompt", "layer", "token")
        real = xr.DataArray(np.arange(x.sizes["token"]) < np.asarray(n_tokens)[:, None], dims=("prompt", "token"))
        kept = x.where(where & real)
        return kept.sum(["prompt", "token"], skipna=True), kept.notnull().sum(["prompt", "token"]).astype(np.float64)
    totals = prompt_moments(x, n_tokens, where, full=False).sum("prompt")
    return totals.sel(moment="sum", drop=True), totals.sel(moment="count", drop=True)


def prompt_sums(x: xr.DataArray, n_tokens: np.ndarray, where: xr.DataArray | None = None) -> xr.DataArray:
    """Per prompt, the sum over ``token`` of ``x`` (..., prompt, layer, token) at :func:`position_sum`'s
    positions: (..., prompt, layer), NaN where none of a prompt's positions counts (the per-prompt sums a
    bootstrap over prompts resamples). Lazy when ``x`` is.

    >>> x = xr.DataArray([[[1.0, 2.0, np.nan]], [[4.0, np.nan, np.nan]]], dims=("prompt", "layer", "token"))
    >>> prompt_sums(x, np.array([2, 1])).values.tolist()
    [[3.0], [4.0]]
    """
    if where is not None and set(where.dims) != {"prompt", "token"}:  # e.g. per model_pair: the plain way
        x = x.transpose(..., "prompt", "layer", "token")
        real = xr.DataArray(np.arange(x.sizes["token"]) < np.asarray(n_tokens)[:, None], dims=("prompt", "token"))
        return x.where(where & real).sum("token", skipna=True, min_count=1)
    moments = prompt_moments(x, n_tokens, where, full=False)
    count = moments.sel(moment="count", drop=True)
    return moments.sel(moment="sum", drop=True).where(count > 0)


def position_sum(x: xr.DataArray, n_tokens: np.ndarray, where: xr.DataArray | None = None) -> xr.DataArray:
    """The sum over ``prompt`` and ``token`` of ``x`` (..., prompt, layer, token) at the real positions that
    ``where`` (prompt, token; None: all) keeps and where ``x`` is not NaN; NaN where no position counts.
    ``xr.where`` and ``sum`` would each pass over the padded array; here a task per block of prompts touches
    its real tokens only (on a ragged store a small share of the padded layout). Lazy when ``x`` is.

    >>> x = xr.DataArray([[[1.0, 2.0, np.nan]], [[4.0, np.nan, np.nan]]], dims=("prompt", "layer", "token"))
    >>> position_sum(x, np.array([2, 1])).values.tolist()  # per layer
    [7.0]
    >>> keep = xr.DataArray([[True, False, True], [True] * 3], dims=("prompt", "token"))
    >>> position_sum(x, np.array([2, 1]), keep).values.tolist()
    [5.0]
    """
    total, count = _position_totals(x, n_tokens, where)
    return total.where(count > 0)


def position_mean(x: xr.DataArray, n_tokens: np.ndarray, where: xr.DataArray | None = None) -> xr.DataArray:
    """The mean over ``prompt`` and ``token`` of :func:`position_sum`'s positions (NaN where none).

    >>> x = xr.DataArray([[[1.0, 2.0, np.nan]], [[4.0, np.nan, np.nan]]], dims=("prompt", "layer", "token"))
    >>> position_mean(x, np.array([2, 1])).values.tolist()
    [2.3333333333333335]
    """
    total, count = _position_totals(x, n_tokens, where)
    return total / count.where(count > 0)
