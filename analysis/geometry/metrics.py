"""Geometric metrics of the residual stream, lazily, per pass and per pair of passes.

Axes: pass_ or pair, prompt, layer, token (the ``dim`` axis is reduced away). Every
function returns Dask-backed xarray objects and computes nothing; float16 residuals
are summed in float64 by the fused kernel of :mod:`analysis.compute.dim_sums` (``cosine_prev``'s
dot product, which crosses layer tiles, in float32). Padding positions are NaN in ``resid`` and so NaN here,
which every reduction skips.

Names and signs, once (the legacy ``norm_delta`` meant two different things):

- ``norm``: ||h_l||, the L2 norm of the residual at layer l.
- ``norm_delta``: ||h_l|| - ||h_{l-1}||, the change from the previous layer of the same
  pass (NaN at layer 0). Never a difference between passes.
- ``cosine_prev``: cos(h_l, h_{l-1}) within a pass (NaN at layer 0).
- per pair (left, right): ``norm_left``, ``norm_right``, ``norm_diff`` = ||h_right - h_left||,
  ``rel_norm_diff`` = ||h_right - h_left|| / ||h_left|| (scale-free: a sink position's huge norm does
  not make its change look huge), ``cosine_sim`` = cos(h_left, h_right), ``cosine_prev_left/right``,
  ``norm_delta_left/right``, and from the stored lens statistics ``entropy_left/right``
  and ``kl`` = KL(right || left).
"""

from __future__ import annotations

import functools

import dask.array as da
import numpy as np
import xarray as xr

from analysis.compute import by_position, ragged_sums
from analysis.compute.bootstrap import RESAMPLES, SEED, with_intervals
from analysis.compute.dim_sums import previous_layer_dots, residual_sums
from store.errors import MissingData, UsageError
from store.location import xarray_kwargs
from store.schema import default_pass_pairs

EPS = 1e-8
PASS_METRICS = ("norm", "norm_delta", "cosine_prev")
# Metrics read through a lens (from the stored statistics, not the residuals): their tables and titles name it.
LENS_METRICS = ("kl", "entropy", "entropy_left", "entropy_right", "target_logprob", "target_logprob_left",
                "target_logprob_right", "logprob_diff")
PAIR_METRICS = ("norm_left", "norm_right", "norm_diff", "rel_norm_diff", "cosine_sim", "cosine_prev_left",
                "cosine_prev_right", "norm_delta_left", "norm_delta_right", "entropy_left", "entropy_right", "kl",
                "target_logprob_left", "target_logprob_right", "logprob_diff")


def _resid32(ds: xr.Dataset) -> xr.DataArray:
    _require_resid(ds)
    return ds.resid.astype("float32")


def _require_resid(ds: xr.Dataset) -> None:
    if "resid" not in ds:
        raise MissingData(what="residuals (a statistics-only store from import-json)",
                          fix="geometric metrics come from its stored variables instead")


def _residual_sums(ds: xr.Dataset, layout: str = "padded") -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """Lazy ``sum h^2`` (pass_, ...), ``sum h_left h_right`` and ``sum (h_right - h_left)^2`` (pair, ...).

    One fused task per (prompt, layer) tile reads all passes of the tile once; the
    graph is deterministic, so metrics built from it in one compute share the reads.
    ``layout="positions"``: over (layer, position), the real positions only, on a ragged store.
    """
    _require_resid(ds)
    names, left, right = store_pass_pairs(ds)
    passes = [str(p) for p in ds.pass_.values]
    left_q = np.array([passes.index(p) for p in left], dtype=np.int64)
    right_q = np.array([passes.index(p) for p in right], dtype=np.int64)
    if ragged_sums.applies(ds):
        return _split_sums(ds, ragged_sums.sums_over_runs(ds, left_q, right_q, layout), names, left, right)
    resid = ds.resid.transpose(..., "pass_", "prompt", "layer", "token", "dim")
    lead = resid.dims[:-5]  # e.g. model_pair from open_stores
    data = resid.data if isinstance(resid.data, da.Array) else da.from_array(resid.data)
    n_lead = len(lead)
    data = data.rechunk({n_lead + 4: -1})
    n_pass, n_pair = len(passes), len(names)
    per_pass = [data[(slice(None),) * n_lead + (slice(s, s + 1),)] for s in range(n_pass)]
    sums = da.map_blocks(_block_sums, *per_pass, left_q=left_q, right_q=right_q, n_lead=n_lead, dtype=np.float64,
                         drop_axis=n_lead + 4,
                         chunks=(*data.chunks[:n_lead], (n_pass + 2 * n_pair,), *data.chunks[n_lead + 1:n_lead + 4]),
                         meta=np.empty((0,) * (n_lead + 4), np.float64))
    dims = (*lead, "term", "prompt", "layer", "token")
    coords = {d: resid[d] for d in dims if d in resid.coords and d != "term"}
    return _split_sums(ds, xr.DataArray(sums, dims=dims, coords=coords), names, left, right)


def _split_sums(ds: xr.Dataset, sums: xr.DataArray, names, left, right):
    n_pass, n_pair = ds.sizes["pass_"], len(names)
    sumsq = sums.isel(term=slice(0, n_pass)).rename(term="pass_").assign_coords(pass_=ds.pass_)
    pair_coords = {"pair": names, "left": ("pair", left), "right": ("pair", right)}
    dot = sums.isel(term=slice(n_pass, n_pass + n_pair)).rename(term="pair").assign_coords(pair_coords)
    sqdiff = sums.isel(term=slice(n_pass + n_pair, None)).rename(term="pair").assign_coords(pair_coords)
    return sumsq, dot, sqdiff


def _block_sums(*blocks: np.ndarray, left_q: np.ndarray, right_q: np.ndarray, n_lead: int) -> np.ndarray:
    # Each block is one pass: (*lead, 1, prompt, layer, token, dim).
    lead_shape = blocks[0].shape[:n_lead]
    out = None
    for index in np.ndindex(*lead_shape):
        sums = residual_sums([b[index][0] for b in blocks], left_q, right_q)
        if out is None:
            out = np.empty(lead_shape + sums.shape, dtype=sums.dtype)
        out[index] = sums
    return out


def _previous_layer(x: xr.DataArray) -> xr.DataArray:
    return x.shift(layer=1)


def _previous_layer_dots(ds: xr.Dataset, layout: str = "padded") -> xr.DataArray:
    """Lazy ``sum_d h_l h_(l-1)`` per (pass_, prompt, layer, token): one task per chunk when a chunk holds
    every layer (the usual layout), else an expression across layer tiles (float32)."""
    if ragged_sums.applies(ds):
        dots = ragged_sums.previous_layer_dots_over_runs(ds, layout)
        return dots.rename(term="pass_").assign_coords(pass_=ds.pass_)
    resid = ds.resid
    layer_axis = resid.dims.index("layer")
    if resid.chunks is None or len(resid.chunks[layer_axis]) > 1 or resid.dims[-1] != "dim":
        h = _resid32(ds)
        return (h * _previous_layer(h)).sum("dim", skipna=False)
    data = resid.data.rechunk({resid.ndim - 1: -1})
    dots = da.map_blocks(previous_layer_dots, data, layer_axis=layer_axis, drop_axis=resid.ndim - 1,
                         dtype=np.float64, meta=np.empty((0,) * (resid.ndim - 1), np.float64))
    dims = resid.dims[:-1]
    return xr.DataArray(dots, dims=dims, coords={d: resid[d] for d in dims if d in resid.coords})


def pass_metrics(ds: xr.Dataset, layout: str = "padded") -> xr.Dataset:
    """``norm``, ``norm_delta`` and ``cosine_prev`` for every (pass_, prompt, layer, token), lazily.

    On a statistics-only store the stored values are returned. ``layout="positions"``: over (pass_, layer,
    position) instead, the real positions only (``analysis.compute.ragged_sums``), on a ragged store.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> m = pass_metrics(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> sorted(m.data_vars), m.norm.dims
    (['cosine_prev', 'norm', 'norm_delta'], ('pass_', 'prompt', 'layer', 'token'))
    """
    ragged_sums.check_layout(layout)
    if "resid" not in ds and all(name in ds for name in PASS_METRICS):
        return ds[list(PASS_METRICS)]
    sumsq = _residual_sums(ds, layout)[0]
    norm = np.sqrt(sumsq)
    dot_prev = _previous_layer_dots(ds, layout)
    cosine_prev = dot_prev / np.maximum(norm * _previous_layer(norm), EPS)
    return xr.Dataset({
        "norm": norm.astype("float32").assign_attrs(long_name="||h_l||"),
        "norm_delta": (norm - _previous_layer(norm)).astype("float32").assign_attrs(
            long_name="||h_l|| - ||h_(l-1)||, same pass"),
        "cosine_prev": cosine_prev.astype("float32").assign_attrs(long_name="cos(h_l, h_(l-1)), same pass"),
    })


def store_pass_pairs(ds: xr.Dataset) -> tuple[list[str], list[str], list[str]]:
    """(names, left passes, right passes) of the store's pairs.

    A store captured with lens statistics lists its pairs; one without (``--no-lens``)
    gets every pair of its passes in pass order (BB-BS, BB-SB, ... SB-SS for the default
    four), so that geometric pair metrics work on residual-only stores too.
    """
    if "pair" in ds.dims:
        return [str(x) for x in ds.pair.values], [str(x) for x in ds.left.values], [str(x) for x in ds.right.values]
    splits = ds.split_layer.values if "split_layer" in ds.coords else [0] * ds.sizes["pass_"]
    crossed = ds.lower_body.values != ds.upper_body.values if "split_layer" in ds.coords else [False] * len(splits)
    plan = [{"name": str(p), "llm": str(m), **({"split": int(s)} if c else {})}
            for p, m, s, c in zip(ds.pass_.values, ds.model.values, splits, crossed, strict=True)]
    combos = default_pass_pairs(plan)
    return [q[0] for q in combos], [q[1] for q in combos], [q[2] for q in combos]


def select_side(ds: xr.Dataset, x: xr.DataArray, side: str) -> xr.DataArray:
    """``x`` (over pass_) taken at each pair's ``left`` or ``right`` pass, as a DataArray over ``pair``."""
    names, left, right = store_pass_pairs(ds)
    # The pass's own labels (model, embedding...) differ between sides: keep only the pair's.
    pass_labels = [name for name, coord in ds.coords.items() if coord.dims == ("pass_",) and name != "pass_"]
    picked = x.sel(pass_=left if side == "left" else right).drop_vars(pass_labels, errors="ignore")
    return picked.rename(pass_="pair").assign_coords(pair=names, left=("pair", left), right=("pair", right))


def pair_metrics(ds: xr.Dataset, lens: str = "raw", names: list[str] | None = None,
                 layout: str = "padded") -> xr.Dataset:
    """The per-pair metrics of :data:`PAIR_METRICS` (or of ``names`` only: each is a graph to build, and a
    store's statistics have a chunk per few prompts and tokens) for every (pair, prompt, layer, token), lazily.

    ``lens`` picks the lens of the stored ``entropy`` and ``kl`` (``raw`` or ``norm``). ``layout="positions"``
    lays them out over (pair, layer, position), the real positions only, where :func:`positions_apply`
    (a ragged store, metrics from the residuals); the reductions of ``analysis.compute.reductions`` take
    either layout and give the same numbers.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store, pair_metrics
    >>> m = pair_metrics(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")), names=["norm_diff"])
    >>> m.norm_diff.dims, m.sizes["pair"]
    (('pair', 'prompt', 'layer', 'token'), 6)
    """
    if not store_pass_pairs(ds)[0]:
        raise MissingData(what="pairs of passes", fix="capture with at least two passes")
    if "lens" in ds.dims and lens not in ds.lens.values:
        have = [str(x) for x in ds.lens.values]
        raise UsageError(f"lens {lens!r} is not in this store; it has {', '.join(have)}: choose one with "
                         f"--lens {have[0]}")

    def side(x: xr.DataArray, which: str) -> xr.DataArray:
        return select_side(ds, x, which)

    # Built once however many metrics use them (each is a graph of a task per run or chunk to build).
    ragged_sums.check_layout(layout)
    if layout == "positions" and not positions_apply(ds, names or PAIR_METRICS):
        layout = "padded"
    passes = functools.cache(lambda: pass_metrics(ds, layout))
    sums = functools.cache(lambda: _residual_sums(ds, layout))

    def per_pass(name: str, which: str):
        return lambda: side(passes()[name], which)

    build = {f"{name}_{which}": per_pass(name, which) for name in ("norm", "cosine_prev", "norm_delta")
             for which in ("left", "right")}
    if "resid" in ds:
        def norm_diff():
            return np.sqrt(sums()[2]).astype("float32").assign_attrs(long_name="||h_right - h_left||")

        def rel_norm_diff():
            sumsq, _, sqdiff = sums()
            return (np.sqrt(sqdiff) / np.maximum(np.sqrt(side(sumsq, "left")), EPS)).astype("float32").assign_attrs(
                long_name="||h_right - h_left|| / ||h_left|| (scale-free)")

        def cosine_sim():
            sumsq, dot, _ = sums()
            scale = np.maximum(np.sqrt(side(sumsq, "left")) * np.sqrt(side(sumsq, "right")), EPS)
            return (dot / scale).astype("float32").assign_attrs(long_name="cos(h_left, h_right)")

        build |= {"norm_diff": norm_diff, "rel_norm_diff": rel_norm_diff, "cosine_sim": cosine_sim}
    else:
        build |= {"norm_diff": lambda: ds.norm_diff, "cosine_sim": lambda: ds.cosine_sim}
    if "entropy" in ds:
        def entropy(which: str):
            return lambda: side(ds.entropy.sel(lens=lens, drop=True), which)

        build |= {"entropy_left": entropy("left"), "entropy_right": entropy("right"),
                  "kl": lambda: ds.kl.sel(lens=lens, drop=True).assign_attrs(long_name="KL(right || left)",
                                                                             units="nats")}
    if "target_logprob" in ds:  # stores made from 2026-12-07 on
        def target(which: str):
            return lambda: side(ds.target_logprob.sel(lens=lens, drop=True), which)

        build |= {"target_logprob_left": target("left"), "target_logprob_right": target("right"),
                  "logprob_diff": lambda: (target("right")() - target("left")()).assign_attrs(
                      long_name="log p_right(next token) - log p_left(next token)", units="nats")}
    wanted = PAIR_METRICS if names is None else [name for name in PAIR_METRICS if name in names]
    return xr.Dataset({name: build[name]() for name in wanted if name in build})


def positions_apply(ds: xr.Dataset, names) -> bool:
    """Whether the metrics ``names`` can be laid out over real positions only: a ragged store's residuals
    (no lens metric: the statistics keep their padded chunks)."""
    return ragged_sums.applies(ds) and not set(names) & set(LENS_METRICS)


def layout_for(ds: xr.Dataset, names) -> str:
    """``"positions"`` where :func:`positions_apply` to the metrics ``names``, else ``"padded"``: the layout a
    command computes them in (the same numbers either way)."""
    return "positions" if positions_apply(ds, names) else "padded"


def summarize_over(metric: xr.DataArray, axis: str = "layer", n_tokens: np.ndarray | None = None,
                   where: xr.DataArray | None = None, intervals: bool = False, resamples: int = RESAMPLES,
                   seed: int = SEED) -> xr.Dataset:
    """mean, std (population), min and max of a metric per ``axis`` value (``layer`` or ``token``), over every
    other position axis, at the real positions (``n_tokens`` per prompt, by default the metric's own
    coordinate) that ``where`` (prompt, token; None: all) keeps; padding (NaN) never enters a statistic. Sums in
    float64, a task per block of prompts touching its real tokens only. Lazy. With ``intervals`` (and a
    ``prompt`` axis), ``mean_low`` and ``mean_high``: the mean's 95% bootstrap interval over prompts, from
    the per-prompt sums (``analysis.compute.bootstrap``).

    Examples
    --------
    >>> x = xr.DataArray([[[1.0, 3.0, np.nan]], [[5.0, np.nan, np.nan]]], dims=("prompt", "layer", "token"))
    >>> s = summarize_over(x, "layer", n_tokens=np.array([2, 1]))
    >>> [float(s[k][0]) for k in ("mean", "min", "max")], round(float(s["std"][0]), 4)
    ([3.0, 1.0, 5.0], 1.633)
    """
    if axis not in ("layer", "token"):
        raise UsageError(f"axis must be layer or token, got {axis!r}")
    over = [d for d in ("prompt", "layer", "token") if d in metric.dims and d != axis]
    if by_position.applies(metric):  # real positions only: the same partials, a block per run
        over = ["prompt", "token" if axis == "layer" else "layer"]
    if len(over) == 2:
        from analysis.compute.reductions import combine_moments, prompt_moments, real_lengths, split_where

        metric, where = split_where(metric, where)
        moments = prompt_moments(metric, real_lengths(metric, n_tokens), where, over=over[1])
        summary = combine_moments(moments, "prompt").astype(np.result_type(metric.dtype, np.float32))
        if not intervals:
            return summary
        sums = moments.sel(moment="sum", drop=True).fillna(0)  # a prompt without a counted position adds 0
        return with_intervals(summary, {"mean": (sums, moments.sel(moment="count", drop=True))}, resamples, seed)
    values = metric.astype("float32") if where is None else metric.astype("float32").where(where)
    return xr.Dataset({
        "mean": values.mean(over, skipna=True), "std": values.std(over, skipna=True),
        "min": values.min(over, skipna=True), "max": values.max(over, skipna=True),
    })


def _default_names(stores: list[xr.Dataset], paths: list) -> list[str]:
    """Each store's pair label; where labels repeat (stores of one pair), the stores' file names, numbered if
    those repeat too.

    >>> _default_names([xr.Dataset(attrs={"pair_label": "p"})] * 2, ["a/run.zarr", "b/run.zarr"])
    ['run-1', 'run-2']
    """
    from pathlib import Path

    labels = [ds.attrs.get("pair_label") or Path(str(p)).stem for ds, p in zip(stores, paths, strict=True)]
    if len(set(labels)) == len(labels):
        return labels
    stems = [Path(str(p).rstrip("/")).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{stem}-{i + 1}" for i, stem in enumerate(stems)]


def open_stores(paths: list, names: list[str] | None = None) -> xr.Dataset:
    """Open several stores lazily and stack them along a new ``model_pair`` dimension.

    They must agree in every size and in their prompts' tokens (stores of the same
    prompts captured on models of one shape, e.g. a sweep of checkpoints); otherwise a
    :class:`UsageError` names the first difference. ``names`` default to the stores' pair
    labels, or their file names where two stores hold the same pair.
    """
    from store.reader import open_store

    stores = [open_store(p) for p in paths]
    names = list(names or _default_names(stores, paths))
    if len(set(names)) != len(names):
        raise UsageError(f"model_pair names must be unique, got {names}; pass names explicitly")
    first = stores[0]
    for name, ds in zip(names[1:], stores[1:], strict=True):
        for dim in sorted(set(first.sizes) | set(ds.sizes)):
            if first.sizes.get(dim) != ds.sizes.get(dim):
                raise UsageError(f"stores {names[0]!r} and {name!r} cannot be combined: {dim} is "
                                 f"{first.sizes.get(dim)} vs {ds.sizes.get(dim)}; combine stores of one shape "
                                 "or analyse them separately")
    # Labels are compared straight from Zarr, so that opening computes nothing through Dask.
    labels = [xr.open_zarr(str(p), chunks=None, **xarray_kwargs(p)) for p in paths]
    for name, ds in zip(names[1:], labels[1:], strict=True):
        for coord in ("pass_", "token_id"):
            if coord in labels[0].coords and not np.array_equal(labels[0][coord].values, ds[coord].values):
                raise UsageError(f"stores {names[0]!r} and {name!r} cannot be combined: their {coord} differ")
    combined = xr.concat(stores, dim="model_pair", coords="minimal", compat="override", join="override",
                         combine_attrs="drop_conflicts")
    return combined.assign_coords(model_pair=names)
