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

from analysis.compute import ragged_sums
from analysis.compute.by_position import per_prompt_tokens
from analysis.geometry.metrics import pass_metrics

MASSIVE_FACTOR = 10.0  # a position's norm over the median of its prompt and layer


def _prompt_ratios(sumsq_slt: np.ndarray) -> tuple[np.ndarray, int]:
    """One prompt's (pass, layer, token) sums of squares -> float32 ``||h|| / median ||h||`` over its real tokens
    (the same pass and layer), and how many real tokens it has. Padding is trailing, so the median is a plain
    one over them (a real NaN falls back to ``nanmedian``)."""
    real_t = ~np.isnan(sumsq_slt).all(axis=(0, 1))
    length = len(real_t) - int(np.argmax(real_t[::-1])) if real_t.any() else 0
    norm = np.sqrt(sumsq_slt[..., :length]).astype(np.float32)  # as pass_metrics' norm
    with warnings.catch_warnings():  # a (pass, layer) of a real NaN only: no median, no ratio
        warnings.simplefilter("ignore", RuntimeWarning)
        median = (np.nanmedian if np.isnan(norm).any() else np.median)(norm, axis=-1, keepdims=True)
    return norm / median, length


def _ratios(sumsq_nslt: np.ndarray) -> np.ndarray:
    # (..., pass, layer, token) -> the same shape: each prompt's ratios, NaN on padding
    flat = sumsq_nslt.reshape(-1, *sumsq_nslt.shape[-3:])
    out = np.full(flat.shape, np.nan, np.float32)
    for n, prompt in enumerate(flat):
        ratio, length = _prompt_ratios(prompt)
        out[n, ..., :length] = ratio
    return out.reshape(sumsq_nslt.shape)


def peak_ratios(sumsq_nslt: np.ndarray) -> np.ndarray:
    """(..., pass, layer, token) sums of squares -> (..., token) ``peak_ratio``: the largest over passes and
    layers of ``||h|| / median ||h||`` over the real tokens of the same pass, prompt and layer (NaN on padding).

    One function per block of prompts, for :func:`massive_positions` and for the tasks that find massive
    positions while they read (``analysis.compute.masked_sums``): the same numbers either way.

    >>> s = np.array([[[[1.0, 4.0, 400.0, np.nan]]]])  # 1 prompt, 1 pass, 1 layer; norms 1, 2, 20
    >>> peak_ratios(s).round(2).tolist()
    [[0.5, 1.0, 10.0, nan]]
    """
    flat = sumsq_nslt.reshape(-1, *sumsq_nslt.shape[-3:])
    out = np.full((flat.shape[0], flat.shape[-1]), np.nan, np.float32)
    for n, prompt in enumerate(flat):
        ratio, length = _prompt_ratios(prompt)
        if length:
            with warnings.catch_warnings():  # a token whose every ratio is NaN has no peak
                warnings.simplefilter("ignore", RuntimeWarning)
                out[n, :length] = np.nanmax(ratio, axis=(0, 1))
    return out.reshape(*sumsq_nslt.shape[:-3], sumsq_nslt.shape[-1])


def _per_prompt(ds: xr.Dataset, func, keeps_pass_and_layer: bool) -> xr.DataArray:
    """``func`` over blocks of prompts of every pass's sums of squares (prompt, pass, layer, token), lazily:
    from the residuals, or from the stored norms of a statistics-only store."""
    from analysis.geometry.metrics import _residual_sums

    sumsq = _residual_sums(ds)[0] if "resid" in ds else pass_metrics(ds).norm.astype(np.float64) ** 2
    sumsq = sumsq.transpose(..., "prompt", "pass_", "layer", "token")
    core = sumsq.ndim - 3
    kept = sumsq.dims if keeps_pass_and_layer else (*sumsq.dims[:core], "token")
    if sumsq.chunks is None:
        values = func(sumsq.values)
    else:
        data = sumsq.data.rechunk({core: -1, core + 1: -1, core + 2: -1})
        values = da.map_blocks(func, data, drop_axis=[] if keeps_pass_and_layer else [core, core + 1],
                               dtype=np.float32, meta=np.empty((0,) * len(kept), np.float32))
    return xr.DataArray(values, dims=kept, coords={d: sumsq[d] for d in kept if d in sumsq.coords})


def norm_ratio(ds: xr.Dataset) -> xr.DataArray:
    """||h|| / median ||h|| over the real tokens of the same pass, prompt and layer, lazily (float32)."""
    ratio = _per_prompt(ds, _ratios, keeps_pass_and_layer=True)
    return ratio.transpose(..., "pass_", "prompt", "layer", "token").rename("norm_ratio")


def massive_positions(ds: xr.Dataset, factor: float = MASSIVE_FACTOR, layout: str = "padded") -> xr.Dataset:
    """``massive`` (prompt, token): a position over ``factor`` x its layer's median norm in any pass and layer;
    ``peak_ratio`` (prompt, token): its largest ratio (:func:`peak_ratios`, a task per block of prompts). Lazy.
    ``layout="positions"`` finds them from the real positions' sums (``analysis.geometry.metrics``'s layout
    of the same name): the same answer, from the sums the metrics of that layout read.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> found = massive_positions(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> bool(found.massive.any())  # random residuals have no sink
    False
    """
    ragged_sums.check_layout(layout)
    if layout == "positions" and "resid" in ds and ragged_sums.applies(ds):
        from analysis.geometry.metrics import _residual_sums

        sumsq = _residual_sums(ds, layout)[0]  # (pass_, layer, position)
        peak = per_prompt_tokens(sumsq, peak_ratios, ds.sizes["prompt"], ds.sizes["token"])
        peak = peak.assign_coords(prompt=ds.prompt, token=ds.token)
    else:
        peak = _per_prompt(ds, peak_ratios, keeps_pass_and_layer=False).assign_coords(prompt=ds.prompt)
    return xr.Dataset({"massive": (peak > factor).assign_attrs(factor=factor),
                       "peak_ratio": peak}).assign_attrs(factor=factor)


def describe_massive(ds: xr.Dataset, found: xr.Dataset, included: bool = False, limit: int = 10) -> list[str]:
    """Lines naming the massive positions found (prompt, token position, token text, peak ratio)."""
    massive = np.asarray(found.massive.values)
    if not massive.any():
        return [f"massive activations: none (no position over {found.attrs['factor']:g}x its layer's median norm)"]
    from analysis.readouts.tokens import token_text_table, visible

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
