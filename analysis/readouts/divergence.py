"""What the fine-tuned model says: readouts over the generated responses of a ``capture --generate`` store.

Response position ``j`` (0, 1, 2, ...) is the prediction of the response's token ``j``: it is made at the
stored token ``response_start + j - 1`` (position 0 at the prompt's last token), under the norm lens at the
model's last layer, which is the model's own output. There, per pair of passes: the KL divergence of the
right pass from the left (``kl``), the log-probability difference right - left of the token the response
actually has (``logprob_diff``, from ``target_logprob``), and whether the right pass's top-1 token is
outside the left pass's top-3 (``shifted``, URIAL's token distribution shift, as :func:`shift_rate`).
The first divergence of a pair is the first response position where the two passes' top-1 (greedy) tokens
differ. Everything here is lazy, reading one lens and one layer of the statistics.

Legend: ``_pj`` (prompt, response position).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.errors import MissingData
from store.schema import lens_layers

RESPONSE = "response"  # the response-position dimension


def check_responses(ds: xr.Dataset) -> int:
    """The last layer's number, after checking ``ds`` holds responses and their output statistics."""
    if "response_start" not in ds.coords:
        raise MissingData(what="generated responses", fix="capture with --generate N (the passes then run over "
                          "each prompt followed by the response a model wrote)")
    if "topk_id" not in ds or ds.sizes.get("k", 0) < 3:
        raise MissingData(what="top-3 lens statistics", fix="capture with lens statistics and --top-k 3 or more")
    last = int(ds.attrs.get("models", {}).get("base", {}).get("n_layers", max(lens_layers(ds))))
    if last not in lens_layers(ds):
        raise MissingData(what=f"lens statistics at the models' last layer ({last}), where the norm lens is the "
                          "model's output", fix="capture with that layer in --layers and --lens-layers (e.g. -1)")
    return last


def response_tokens(ds: xr.Dataset) -> xr.DataArray:
    """(prompt, response): the stored token index at which each response position is predicted, -1 where the
    prompt's response has no token there. Computed now (it is small)."""
    start = np.asarray(ds.response_start.values, dtype=np.int64)
    n_tokens = np.asarray(ds.n_tokens.values, dtype=np.int64)
    width = int(max((n_tokens - start).max(initial=0), 1))
    j = np.arange(width)
    token_pj = start[:, None] + j[None, :] - 1
    # the last stored token predicts no stored token
    token_pj = np.where(token_pj < (n_tokens - 1)[:, None], token_pj, -1)
    return xr.DataArray(token_pj, dims=("prompt", RESPONSE), coords={"prompt": ds.prompt, RESPONSE: j})


def _at_responses(x: xr.DataArray, token_pj: xr.DataArray) -> xr.DataArray:
    """``x`` (..., prompt, token) at each (prompt, response position); NaN / masked where there is none."""
    prompts = xr.DataArray(np.arange(x.sizes["prompt"])[:, None].repeat(token_pj.sizes[RESPONSE], 1),
                           dims=("prompt", RESPONSE))
    x = x.drop_vars([name for name, c in x.coords.items() if {"prompt", "token"} & set(c.dims)])  # per position
    picked = x.isel(prompt=prompts, token=token_pj.clip(min=0).drop_vars("prompt"))
    return picked.assign_coords(prompt=token_pj.prompt, **{RESPONSE: token_pj[RESPONSE]}).where(token_pj >= 0)


def _output(ds: xr.Dataset, name: str) -> xr.DataArray:
    last = check_responses(ds)
    return ds[name].sel(lens="norm", layer=last, drop=True)


def response_readouts(ds: xr.Dataset) -> xr.Dataset:
    """Per (pair, prompt, response position): ``kl``, ``logprob_diff`` (when the store has ``target_logprob``),
    ``shifted`` (1.0 or 0.0), ``diverged`` (the two passes' top-1 tokens differ) and those tokens,
    ``left_top1`` and ``right_top1``; NaN past each response. Lazy.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import fill_lens_statistics, write_tiny_store
    >>> from analysis import open_store
    >>> ds = open_store(fill_lens_statistics(write_tiny_store(tempfile.mkdtemp() + "/s.zarr", responses=True)))
    >>> sorted(response_readouts(ds).data_vars)
    ['diverged', 'kl', 'left_top1', 'logprob_diff', 'right_top1', 'shifted']
    """
    from analysis.geometry.metrics import select_side

    check_responses(ds)
    token_pj = response_tokens(ds)
    top = _at_responses(_output(ds, "topk_id"), token_pj)
    left_top = select_side(ds, top, "left")
    right_top1 = select_side(ds, top.isel(k=0, drop=True), "right")
    valid = token_pj >= 0
    out = {
        "kl": _at_responses(_output(ds, "kl"), token_pj),
        "shifted": (~(left_top.isel(k=slice(0, 3)) == right_top1).any("k")).astype("float32").where(valid),
        "diverged": (left_top.isel(k=0, drop=True) != right_top1).where(valid),
        "left_top1": left_top.isel(k=0, drop=True).where(valid),
        "right_top1": right_top1.where(valid),
    }
    if "target_logprob" in ds:
        logprob = _at_responses(_output(ds, "target_logprob"), token_pj)
        out["logprob_diff"] = select_side(ds, logprob, "right") - select_side(ds, logprob, "left")
    return xr.Dataset(out)


def first_divergence(ds: xr.Dataset, readouts: xr.Dataset | None = None) -> xr.DataArray:
    """(pair, prompt): the first response position where the pair's two passes' greedy (top-1) tokens at the
    output differ, -1 where they agree over the whole response. Lazy; assign it as a coordinate with
    ``ds.assign_coords(first_divergence=first_divergence(ds))``; ``readouts``: :func:`response_readouts` of
    ``ds``, when built already."""
    diverged = (response_readouts(ds) if readouts is None else readouts)["diverged"].fillna(0).astype(bool)
    first = diverged.argmax(RESPONSE).where(diverged.any(RESPONSE), -1)
    return first.astype("int64").rename("first_divergence")


def response_curve(ds: xr.Dataset, readouts: xr.Dataset | None = None, intervals: bool = True) -> xr.Dataset:
    """Per (pair, response position): the mean ``kl``, ``logprob_diff`` and ``shift_rate`` over the prompts whose
    response reaches that position, and their count ``n`` (the shallow-alignment curve), each mean with its 95%
    bootstrap interval over prompts (``NAME_low``, ``NAME_high``; ``analysis.compute.bootstrap``) unless
    ``intervals`` is False. Lazy."""
    from analysis.compute.bootstrap import with_intervals

    readouts = response_readouts(ds) if readouts is None else readouts
    values = {name: readouts[name] for name in ("kl", "logprob_diff") if name in readouts}
    values["shift_rate"] = readouts["shifted"]
    out = xr.Dataset({name: value.mean("prompt") for name, value in values.items()})
    out["n"] = readouts["shifted"].notnull().sum("prompt")
    if not intervals:
        return out
    # a prompt's sum at a position is its value there (0 where its response is shorter), its count 1 or 0
    return with_intervals(out, {name: (value.fillna(0), value.notnull().astype(np.float64))
                                for name, value in values.items()})


def around_divergence(ds: xr.Dataset, pair: str, before: int = 2, after: int = 4,
                      readouts: xr.Dataset | None = None) -> xr.Dataset:
    """One pair's mean ``kl``, ``logprob_diff`` and ``shift_rate`` at ``offset`` -before..after response
    positions from each prompt's first divergence (prompts that diverge only), with their count ``n``. Lazy."""
    readouts = response_readouts(ds) if readouts is None else readouts
    first = first_divergence(ds, readouts).sel(pair=pair)
    readouts = readouts.sel(pair=pair)
    offsets = xr.DataArray(np.arange(-before, after + 1), dims="offset")
    # each prompt's value at first + offset, by a mask (lazy, no indexing by computed positions)
    picked = readouts.where((first >= 0) & (readouts[RESPONSE] == first + offsets))
    out = {name: picked[name].mean(["prompt", RESPONSE]) for name in ("kl", "logprob_diff") if name in picked}
    out["shift_rate"] = picked["shifted"].mean(["prompt", RESPONSE])
    out["n"] = picked["shifted"].notnull().sum(["prompt", RESPONSE])
    return xr.Dataset(out).assign_coords(offset=offsets)
