"""Massive activations: the positions whose residual norm dwarfs the rest of their layer.

Trained LLMs route attention to a few "sink" positions (usually the first token) whose
residual norm grows, from the middle layers on, to tens or hundreds of times the other
positions' (Sun et al. 2024, "Massive activations in large language models"). Left in,
one such position dominates every mean, hotspot list, colour scale and spectrum.

A position (prompt, token) is *massive* when, in some pass and at some layer, its
residual norm is more than :data:`MASSIVE_FACTOR` times the median norm of the real
positions of that prompt and layer. ``norm_ratio`` gives that ratio per (pass_, prompt,
layer, token). Lazy; padding never counts.
"""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import xarray as xr

from analysis.metrics import pass_metrics
from analysis.positions import cut_padding_tokens

MASSIVE_FACTOR = 10.0  # a position's norm over the median of its prompt and layer


def norm_ratio(ds: xr.Dataset) -> xr.DataArray:
    """||h|| / median ||h|| over the real tokens of the same pass, prompt and layer, lazily."""
    norm = pass_metrics(ds).norm
    # Labels off for the median: comparing lazy label arrays on the way back would compute them.
    median = xr.apply_ufunc(_median_of_real, norm.reset_coords(drop=True).chunk({"token": -1}),
                            input_core_dims=[["token"]],
                            dask="parallelized", output_dtypes=[norm.dtype])
    return (norm / median).rename("norm_ratio")


def _median_of_real(norms: np.ndarray) -> np.ndarray:
    norms = cut_padding_tokens(norms)
    with warnings.catch_warnings():  # a row of padding only (no real token) has no median: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(norms, axis=-1)


def peak_ratios(sumsq_nslt: np.ndarray) -> np.ndarray:
    """(..., pass, layer, token) sums of squares -> (..., token) ``peak_ratio``: the largest over passes and
    layers of ``||h|| / median ||h||`` over the real tokens of the same pass, prompt and layer (NaN on padding).

    One function per block of prompts, for :func:`massive_positions` and for the tasks that find massive
    positions while they read (``analysis.masked_sums``): the same numbers either way. Padding is trailing,
    so each prompt's median is a plain median over its real tokens (a real NaN falls back to ``nanmedian``).

    >>> s = np.array([[[[1.0, 4.0, 400.0, np.nan]]]])  # 1 prompt, 1 pass, 1 layer; norms 1, 2, 20
    >>> peak_ratios(s).round(2).tolist()
    [[0.5, 1.0, 10.0, nan]]
    """
    *lead, n_pass, n_layer, n_tokens = sumsq_nslt.shape
    flat = sumsq_nslt.reshape(-1, n_pass, n_layer, n_tokens)
    out = np.full((flat.shape[0], n_tokens), np.nan, np.float32)
    real_nt = ~np.isnan(flat).all(axis=(1, 2))
    for n, real_t in enumerate(real_nt):
        length = n_tokens - int(np.argmax(real_t[::-1])) if real_t.any() else 0
        if not length:
            continue
        norm = np.sqrt(flat[n, :, :, :length]).astype(np.float32)  # as pass_metrics' norm
        with warnings.catch_warnings():  # a (pass, layer) of a real NaN only: no median, no ratio
            warnings.simplefilter("ignore", RuntimeWarning)
            median = (np.nanmedian if np.isnan(norm).any() else np.median)(norm, axis=-1, keepdims=True)
            out[n, :length] = np.nanmax(norm / median, axis=(0, 1))
    return out.reshape(*lead, n_tokens)


def massive_positions(ds: xr.Dataset, factor: float = MASSIVE_FACTOR) -> xr.Dataset:
    """``massive`` (prompt, token): a position over ``factor`` x its layer's median norm in any pass and layer;
    ``peak_ratio`` (prompt, token): its largest ratio (:func:`peak_ratios`, a task per block of prompts). Lazy.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> found = massive_positions(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> bool(found.massive.any())  # random residuals have no sink
    False
    """
    from analysis.metrics import _residual_sums

    sumsq = _residual_sums(ds)[0].transpose(..., "prompt", "pass_", "layer", "token")
    lead = sumsq.dims[:-3]  # (model_pair,) prompt
    if sumsq.chunks is None:
        peak = peak_ratios(sumsq.values)
    else:
        data = sumsq.data.rechunk({sumsq.ndim - 3: -1, sumsq.ndim - 2: -1, sumsq.ndim - 1: -1})
        peak = da.map_blocks(peak_ratios, data, drop_axis=[sumsq.ndim - 3, sumsq.ndim - 2], dtype=np.float32,
                             meta=np.empty((0,) * (sumsq.ndim - 2), np.float32))
    labels = {d: sumsq[d] for d in (*lead, "token") if d in sumsq.coords}
    peak = xr.DataArray(peak, dims=(*lead, "token"), coords=labels)
    peak = peak.assign_coords(prompt=ds.prompt)
    return xr.Dataset({"massive": (peak > factor).assign_attrs(factor=factor),
                       "peak_ratio": peak}).assign_attrs(factor=factor)


def describe_massive(ds: xr.Dataset, found: xr.Dataset, included: bool = False, limit: int = 10) -> list[str]:
    """Lines naming the massive positions found (prompt, token position, token text, peak ratio)."""
    massive = np.asarray(found.massive.values)
    if not massive.any():
        return [f"massive activations: none (no position over {found.attrs['factor']:g}x its layer's median norm)"]
    from analysis.difflens import token_text_table, visible

    peak = np.asarray(found.peak_ratio.values)
    rows, tokens = np.nonzero(massive)
    order = np.argsort(-peak[rows, tokens])
    by_token: dict[int, int] = {}
    for t in tokens:
        by_token[int(t)] = by_token.get(int(t), 0) + 1
    common = ", ".join(f"token {t} in {n} of {massive.shape[0]} prompts" for t, n in
                       sorted(by_token.items(), key=lambda x: -x[1])[:3])
    lines = [f"massive activations: {len(rows)} positions over {found.attrs['factor']:g}x their layer's median norm "
             f"({common}); " + ("kept in the summaries below (--include-massive)" if included else
                                 "left out of the summaries below (--include-massive keeps them)")]
    texts = token_text_table(ds)  # decoded (" the"), shown visibly (␣the), not raw pieces (Ġthe)
    for i in order[:limit]:
        r, t = int(rows[i]), int(tokens[i])
        lines.append(f"  prompt {int(ds.prompt.values[r])}, token {t} {visible(texts[r, t])}: {peak[r, t]:.0f}x")
    return lines
