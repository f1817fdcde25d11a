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
MIN_PROMPTS = 2  # prompts that must contribute (a non-zero denominator): one prompt's resamples are all alike
_BLOCK = 64  # resamples formed at once: a block's draws and counts are (block, prompt) arrays...
_BLOCK_CELLS = 1 << 20  # ...of at most this many cells (fewer resamples at once for many prompts)
_TASK_BYTES = 32 << 20  # the per-prompt sums one task resamples (the rest of a statistic's cells: other tasks)


def draws(n_prompts: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resample, draw): the prompts each resample takes, ``n_prompts`` draws with replacement (the same
    numbers, in the same order, as the blocks the intervals draw).

    >>> draws(3, 2, 0).shape
    (2, 3)
    """
    return np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))


def _draw_blocks(n_prompts: int, resamples: int, seed: int):
    """:func:`draws` a block of resamples at a time (a generator's stream does not depend on how it is cut)."""
    rng = np.random.default_rng(seed)
    block = max(1, min(_BLOCK, _BLOCK_CELLS // max(n_prompts, 1)))
    for start in range(0, resamples, block):
        yield rng.integers(0, n_prompts, size=(min(block, resamples - start), n_prompts))


def counts(draws_rp: np.ndarray, n_prompts: int) -> np.ndarray:
    """(resample, prompt) float64: how often each resample drew each prompt.

    >>> counts(np.array([[0, 0, 2]]), 3).tolist()
    [[2.0, 0.0, 1.0]]
    """
    flat = (np.arange(draws_rp.shape[0])[:, None] * n_prompts + draws_rp).ravel()
    return np.bincount(flat, minlength=draws_rp.shape[0] * n_prompts).reshape(-1, n_prompts).astype(np.float64)


def _interval(num_p: np.ndarray, den_p: np.ndarray, blocks) -> np.ndarray:
    num_p, den_p = np.nan_to_num(num_p, nan=0.0), np.nan_to_num(den_p, nan=0.0)
    num_p, den_p = np.broadcast_arrays(num_p, den_p)
    ratios = []
    for draws_rp in blocks:
        weights_pr = counts(draws_rp, num_p.shape[-1]).T
        num_r, den_r = num_p @ weights_pr, den_p @ weights_pr
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(np.where(den_r != 0, num_r / den_r, np.nan))
    ratio_r = np.concatenate(ratios, axis=-1)
    with warnings.catch_warnings():  # a statistic with no resample defined: NaN, said by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(ratio_r, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2], axis=-1)
    bad = (np.isnan(ratio_r).mean(-1) > (1 - LEVEL) / 2) | ((den_p != 0).sum(-1) < MIN_PROMPTS)
    return np.stack([np.where(bad, np.nan, low), np.where(bad, np.nan, high)], axis=-1)


def ratio_interval_np(num_p: np.ndarray, den_p: np.ndarray, draws_rp: np.ndarray) -> np.ndarray:
    """The 95% interval (last axis: low, high) of ``sum(num) / sum(den)`` over the resamples ``draws_rp``
    (resample, draw) of the prompts (last axis of ``num_p`` and ``den_p``; a NaN prompt sum counts as 0). NaN
    where the denominator of more than 2.5% of the resamples is 0 (the statistic is not defined there), and
    where fewer than :data:`MIN_PROMPTS` prompts contribute (an interval of zero width would claim certainty).

    >>> ratio_interval_np(np.ones(4), np.ones(4), draws(4, 50)).tolist()
    [1.0, 1.0]
    >>> ratio_interval_np(np.array([1.0, 0.0]), np.array([1.0, 0.0]), draws(2, 50)).tolist()
    [nan, nan]
    """
    return _interval(num_p, den_p, (draws_rp[s:s + _BLOCK] for s in range(0, draws_rp.shape[0], _BLOCK)))


def seeded_interval_np(num_p: np.ndarray, den_p: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED
                       ) -> np.ndarray:
    """:func:`ratio_interval_np` over :func:`draws` ``(n_prompts, resamples, seed)``, drawn a block at a time (the
    draws of a million prompts are never held at once).

    >>> x = np.arange(1.0, 6.0)
    >>> bool((seeded_interval_np(x, np.ones(5), 200, 3) == ratio_interval_np(x, np.ones(5), draws(5, 200, 3))).all())
    True
    """
    return _interval(num_p, den_p, _draw_blocks(num_p.shape[-1], resamples, seed))


def ratio_interval(num: xr.DataArray, den: xr.DataArray, resamples: int = RESAMPLES, seed: int = SEED
                   ) -> xr.DataArray:
    """Lazy: the 95% bootstrap interval of ``num.sum("prompt") / den.sum("prompt")``, with a ``bound``
    dimension (``low``, ``high``); ``den`` broadcasts against ``num``. A task holds every prompt of at most
    32 MiB of per-prompt sums; the statistic's other cells are split between tasks.

    >>> num = xr.DataArray([[1.0, 2.0, 3.0]], dims=("layer", "prompt"))
    >>> ratio_interval(num, xr.ones_like(num)).sel(bound="low").dims
    ('layer',)
    """
    den = den.broadcast_like(num)
    if num.chunks or den.chunks:
        split = _bounded_chunks(num)
        num, den = num.chunk(split), den.chunk(split)
    out = xr.apply_ufunc(seeded_interval_np, num, den, kwargs={"resamples": resamples, "seed": seed},
                         input_core_dims=[["prompt"], ["prompt"]], output_core_dims=[["bound"]], dask="parallelized",
                         dask_gufunc_kwargs={"output_sizes": {"bound": 2}}, output_dtypes=[np.float64])
    return out.assign_coords(bound=["low", "high"])


def _bounded_chunks(num: xr.DataArray) -> dict:
    """Chunks with every prompt in one and at most :data:`_TASK_BYTES` of num and den per task."""
    cells = max(1, _TASK_BYTES // (16 * num.sizes["prompt"]))  # float64 num and den per prompt
    split = {"prompt": -1}
    for dim in reversed([d for d in num.dims if d != "prompt"]):  # the last dims whole, the first cut
        split[dim] = int(min(num.sizes[dim], cells))
        cells = max(1, cells // num.sizes[dim])
    return split


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
