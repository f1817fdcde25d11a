"""Bootstrap intervals over prompts, from per-prompt sums (never the residuals).

A statistic that is a ratio of sums over positions (a mean, a share) is resampled by drawing prompts with
replacement, ``resamples`` times from a generator seeded by ``seed``, and summing the drawn prompts' sums;
the interval is the 2.5th and 97.5th percentiles of the resampled ratios (95%). The draws are the same for
every statistic of a call, so intervals of one table are comparable.

Legend: ``_p`` prompt, ``_rp`` (resample, drawn prompt).
"""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

RESAMPLES = 1000
SEED = 0


def draws(n_prompts: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resample, drawn prompt): the prompts each resample takes.

    >>> draws(3, 2, 0).shape
    (2, 3)
    """
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def ratio_interval_np(num_p: np.ndarray, den_p: np.ndarray, draws_rp: np.ndarray) -> np.ndarray:
    """The 95% interval (last axis: low, high) of ``sum(num) / sum(den)`` over resampled prompts (last axis of
    ``num_p`` and ``den_p``); NaN where a resample's denominator is 0 in more than 2.5% of draws.

    >>> ratio_interval_np(np.ones(4), np.ones(4), draws(4, 50)).tolist()
    [1.0, 1.0]
    """
    num_r = num_p[..., draws_rp].sum(-1)
    den_r = den_p[..., draws_rp].sum(-1)
    ratio_r = np.where(den_r > 0, num_r / np.where(den_r > 0, den_r, 1), np.nan)
    with warnings.catch_warnings():  # a statistic with no resample defined: NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(ratio_r, [2.5, 97.5], axis=-1)
    bad = np.isnan(ratio_r).mean(-1) > 0.025
    return np.stack([np.where(bad, np.nan, low), np.where(bad, np.nan, high)], axis=-1)


def ratio_interval(num: xr.DataArray, den: xr.DataArray, resamples: int = RESAMPLES, seed: int = SEED
                   ) -> xr.DataArray:
    """Lazy: the 95% bootstrap interval of ``num.sum("prompt") / den.sum("prompt")``, with a ``bound``
    dimension (``low``, ``high``)."""
    chosen = draws(num.sizes["prompt"], resamples, seed)
    out = xr.apply_ufunc(ratio_interval_np, num.chunk({"prompt": -1}) if num.chunks else num,
                         den.chunk({"prompt": -1}) if den.chunks else den, kwargs={"draws_rp": chosen},
                         input_core_dims=[["prompt"], ["prompt"]], output_core_dims=[["bound"]], dask="parallelized",
                         dask_gufunc_kwargs={"output_sizes": {"bound": 2}}, output_dtypes=[np.float64])
    return out.assign_coords(bound=["low", "high"])
