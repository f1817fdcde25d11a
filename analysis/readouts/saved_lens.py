"""Logit-lens quantities of any token, computed lazily from a store's saved lens.

A capture with ``--save-lens`` stores each model's unembedding and final-norm
parameters; with them, logits of tokens that were not tracked at capture time are
one lazy expression over ``resid``. Nothing is computed until asked.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.errors import LensNotSaved, UsageError
from store.schema import LENS_NAMES, LensHead, norm_formula


def _require_saved_lens(ds: xr.Dataset) -> dict:
    if "lens_weight" not in ds or "saved_lens" not in ds.attrs:
        raise LensNotSaved()
    return ds.attrs["saved_lens"]


def lens_logits(ds: xr.Dataset, token_ids: list[int], lens: str = "norm") -> xr.DataArray:
    """Lens logits ``(pass_, prompt, layer, token, token_q)`` of ``token_ids``, lazily.

    Each pass uses the unembedding of its ``unembedding`` coordinate; ``lens="raw"``
    unembeds the residual directly, ``"norm"`` applies the saved final norm first.
    Head extras (bias, logit multiplier, soft-cap) are applied as at capture.

    Examples
    --------
    >>> from store.testing import write_tiny_store
    >>> import tempfile, analysis
    >>> ds = analysis.open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))
    >>> lens_logits(ds, [1, 2])
    Traceback (most recent call last):
    ...
    store.errors.LensNotSaved: this store has no saved lens parameters, ...
    """
    saved = _require_saved_lens(ds)
    if lens not in LENS_NAMES:
        raise UsageError(f"unknown lens {lens!r}; use one of {', '.join(LENS_NAMES)}")
    vocab = ds.sizes["vocab"]
    bad = [t for t in token_ids if not 0 <= int(t) < vocab]
    if bad:
        raise UsageError(f"token ids {bad} are outside the vocabulary (0..{vocab - 1})")
    ids = np.asarray(token_ids, dtype=np.int64)
    per_pass = []
    for name in ds.pass_.values:
        resid = ds.resid.sel(pass_=name).astype("float32")
        source = str(ds.unembedding.sel(pass_=name).values)
        head = LensHead.from_attrs(saved[source], ds.encoding.get("source", "the store"))
        if lens == "norm":
            resid = norm_formula(
                head.norm_kind, resid, ds.lens_norm_weight.sel(source=source),
                ds.lens_norm_bias.sel(source=source), head.norm_eps, lambda x: x.mean("dim"),
            )
        weight = ds.lens_weight.sel(source=source).isel(vocab=ids).rename(vocab="token_q")
        logits = xr.dot(resid, weight, dim="dim")
        logits = logits + ds.lens_bias.sel(source=source).isel(vocab=ids).rename(vocab="token_q")
        logits = head.after_product(logits, np.tanh)
        per_pass.append(logits.drop_vars("source", errors="ignore"))
    out = xr.concat(per_pass, dim="pass_", coords="minimal", compat="override").assign_coords(token_q=ids)
    return out.rename("lens_logit").assign_attrs(lens=lens, long_name=f"{lens}-lens logit of token_q")
