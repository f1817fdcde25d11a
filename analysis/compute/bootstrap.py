"""Bootstrap intervals over prompts, from per-prompt sums (never the residuals).

A statistic that is a ratio of sums over positions (a mean, a share, a rate) is resampled by drawing
prompts with replacement, ``resamples`` times from ``numpy.random.default_rng(seed)``, and summing the
drawn prompts' sums; the interval is the 2.5th and 97.5th percentiles of the resampled ratios (95%,
percentile bootstrap). The draws depend on the number of prompts, ``resamples`` and ``seed`` only, so every
statistic of a call (and of two calls with the same settings) uses the same resamples: intervals of one
table are comparable. A resample is a row of counts (how often each prompt was drawn), so a resampled sum
is a product with the per-prompt sums: memory is (resample block x prompt), never (resample x prompt x
statistic).

Legend: ``_p`` prompt, ``_rp`` (resample, prompt), ``_r`` resample.
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
_BLOCK = 128  # resamples formed at once


def draws(n_prompts: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resample, draw): the prompts each resample takes, ``n_prompts`` draws with replacement.

    >>> draws(3, 2, 0).shape
    (2, 3)
    """
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def counts(draws_rp: np.ndarray, n_prompts: int) -> np.ndarray:
    """(resample, prompt) float64: how often each resample drew each prompt.

    >>> counts(np.array([[0, 0, 2]]), 3).tolist()
    [[2.0, 0.0, 1.0]]
    """
    flat = (np.arange(draws_rp.shape[0])[:, None] * n_prompts + draws_rp).ravel()
    return np.bincount(flat, minlength=draws_rp.shape[0] * n_prompts).reshape(-1, n_prompts).astype(np.float64)


def ratio_interval_np(num_p: np.ndarray, den_p: np.ndarray, draws_rp: np.ndarray) -> np.ndarray:
    """The 95% interval (last axis: low, high) of ``sum(num) / sum(den)`` over resampled prompts (last axis of
    ``num_p`` and ``den_p``; a NaN prompt sum counts as 0). NaN where the denominator of more than 2.5% of
    the resamples is 0 (the statistic is not defined there).

    >>> ratio_interval_np(np.ones(4), np.ones(4), draws(4, 50)).tolist()
    [1.0, 1.0]
    """
    num_p, den_p = np.nan_to_num(num_p, nan=0.0), np.nan_to_num(den_p, nan=0.0)
    num_p, den_p = np.broadcast_arrays(num_p, den_p)
    ratio_r = np.empty((*num_p.shape[:-1], draws_rp.shape[0]))
    for start in range(0, draws_rp.shape[0], _BLOCK):
        weights_pr = counts(draws_rp[start:start + _BLOCK], num_p.shape[-1]).T
        num_r, den_r = num_p @ weights_pr, den_p @ weights_pr
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_r[..., start:start + _BLOCK] = np.where(den_r != 0, num_r / den_r, np.nan)
    with warnings.catch_warnings():  # a statistic with no resample defined: NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(ratio_r, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=-1)
    bad = np.isnan(ratio_r).mean(-1) > (1 - LEVEL) / 2
    return np.stack([np.where(bad, np.nan, low), np.where(bad, np.nan, high)], axis=-1)


def ratio_interval(num: xr.DataArray, den: xr.DataArray, resamples: int = RESAMPLES, seed: int = SEED
                   ) -> xr.DataArray:
    """Lazy: the 95% bootstrap interval of ``num.sum("prompt") / den.sum("prompt")``, with a ``bound``
    dimension (``low``, ``high``); ``den`` broadcasts against ``num``.

    >>> num = xr.DataArray([[1.0, 2.0, 3.0]], dims=("layer", "prompt"))
    >>> ratio_interval(num, xr.ones_like(num)).sel(bound="low").dims
    ('layer',)
    """
    den = den.broadcast_like(num)
    chosen = draws(num.sizes["prompt"], resamples, seed)
    out = xr.apply_ufunc(ratio_interval_np, num.chunk({"prompt": -1}) if num.chunks else num,
                         den.chunk({"prompt": -1}) if den.chunks else den, kwargs={"draws_rp": chosen},
                         input_core_dims=[["prompt"], ["prompt"]], output_core_dims=[["bound"]], dask="parallelized",
                         dask_gufunc_kwargs={"output_sizes": {"bound": 2}}, output_dtypes=[np.float64])
    return out.assign_coords(bound=["low", "high"])


def with_intervals(point: xr.Dataset, sums: dict[str, tuple[xr.DataArray, xr.DataArray]],
                   resamples: int = RESAMPLES, seed: int = SEED) -> xr.Dataset:
    """``point`` with ``NAME_low`` and ``NAME_high`` for each ``NAME: (num, den)`` of per-prompt sums, and the
    resampling's settings in its attributes (``resamples``, ``seed``, ``level``)."""
    out = point.copy()
    for name, (num, den) in sums.items():
        interval = ratio_interval(num, den, resamples, seed)
        out[f"{name}_low"] = interval.sel(bound="low", drop=True)
        out[f"{name}_high"] = interval.sel(bound="high", drop=True)
    return out.assign_attrs(resamples=resamples, seed=seed, level=LEVEL)

