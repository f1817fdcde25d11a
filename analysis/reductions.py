"""Lazy reductions over positions: hotspots, correlations, seven-number summaries.

Inputs are metrics shaped (..., prompt, layer, token) such as those of
:mod:`analysis.metrics`; padding is NaN and never counts. Results are Dask-backed
and computed only when asked.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.errors import UsageError

POSITION = ("prompt", "layer", "token")


def _top_by_magnitude(values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, flat indices) of the n largest |values| along the last axis, largest first; NaN never wins."""
    score = np.where(np.isnan(values), -np.inf, np.abs(values))
    n = min(n, values.shape[-1])
    part = np.argpartition(-score, n - 1, axis=-1)[..., :n]
    order = np.take_along_axis(-score, part, axis=-1).argsort(axis=-1, kind="stable")
    index = np.take_along_axis(part, order, axis=-1)
    picked = np.take_along_axis(values, index, axis=-1)
    # Fewer than n real positions: the rest are padding and are reported as NaN / -1.
    index = np.where(np.isnan(picked), -1, index)
    return picked, index


def hotspots(metric: xr.DataArray, top_n: int = 5) -> xr.Dataset:
    """The ``top_n`` positions with the largest |value|, per leading label (e.g. per pair), lazily.

    Returns ``value``, ``prompt``, ``layer`` and ``token`` along a new ``rank`` dimension
    (-1 and NaN where fewer real positions exist). Token strings: ``ds.token_str``
    at (prompt, token).
    """
    if top_n < 1:
        raise UsageError(f"--top-n must be at least 1, got {top_n}")
    missing = [d for d in POSITION if d not in metric.dims]
    if missing:
        raise UsageError(f"hotspots need a metric over {', '.join(POSITION)}; it lacks {', '.join(missing)}")
    shape = [metric.sizes[d] for d in POSITION]
    flat = metric.astype("float32").stack(position=POSITION).reset_index("position", drop=True)
    flat = flat.chunk({"position": -1}) if flat.chunks else flat
    values, index = xr.apply_ufunc(
        _top_by_magnitude, flat, kwargs={"n": top_n}, input_core_dims=[["position"]],
        output_core_dims=[["rank"], ["rank"]], dask="parallelized", output_dtypes=[np.float32, np.int64],
        dask_gufunc_kwargs={"output_sizes": {"rank": min(top_n, flat.sizes["position"])}},
    )
    prompt, layer, token = index // (shape[1] * shape[2]), (index // shape[2]) % shape[1], index % shape[2]
    valid = index >= 0
    coords = {"prompt": prompt, "layer": layer, "token": token}
    return xr.Dataset({"value": values, **{k: v.where(valid, -1) for k, v in coords.items()}}).assign_coords(
        rank=np.arange(values.sizes["rank"]))


def correlation(a: xr.DataArray, b: xr.DataArray) -> xr.DataArray:
    """Pearson r of two metrics over the positions where both are finite (per leading label), lazily."""
    dims = [d for d in POSITION if d in a.dims and d in b.dims]
    return xr.corr(a.astype("float64"), b.astype("float64"), dim=dims)


def seven_number_summary(metric: xr.DataArray) -> xr.Dataset:
    """min, q1, median, q3, max, mean and std (population) across prompts of each prompt's mean metric.

    Each prompt is first reduced to the mean of its non-padding cells, as the legacy
    summary-stats files did per record; quartiles are the inclusive (linear) ones.
    """
    per_prompt = metric.astype("float64").mean([d for d in ("layer", "token") if d in metric.dims], skipna=True)
    per_prompt = per_prompt.chunk({"prompt": -1}) if per_prompt.chunks else per_prompt
    quartiles = per_prompt.quantile([0.25, 0.5, 0.75], dim="prompt", method="linear", skipna=True)
    return xr.Dataset({
        "min": per_prompt.min("prompt"), "q1": quartiles.sel(quantile=0.25, drop=True),
        "median": quartiles.sel(quantile=0.5, drop=True), "q3": quartiles.sel(quantile=0.75, drop=True),
        "max": per_prompt.max("prompt"), "mean": per_prompt.mean("prompt"), "std": per_prompt.std("prompt"),
    })
