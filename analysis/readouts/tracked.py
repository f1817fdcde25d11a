"""Tracked-token logits: trajectories through the layers and the positions where they change.

Signs follow the rest of resdiff: a pair's ``shift`` is ``right - left`` (the legacy
``TokenLogitPair.diff`` was base - sft, the opposite; see docs/legacy.md).
"""

from __future__ import annotations

import xarray as xr

from analysis.geometry.metrics import select_side
from store.errors import MissingData, UsageError


def _tracked_index(ds: xr.Dataset, token_id: int) -> int:
    if "tracked_logit" not in ds:
        raise MissingData(what="tracked tokens", fix="capture with --track TOKEN, or use analysis.lens_logits "
                          "on a store captured with --save-lens")
    ids = [int(t) for t in ds.tracked_id.values]
    if int(token_id) not in ids:
        raise UsageError(f"token {token_id} is not tracked in this store (tracked: {', '.join(map(str, ids))}); "
                         "capture with --track, or use analysis.lens_logits with a saved lens")
    return ids.index(int(token_id))


def tracked_trajectory(ds: xr.Dataset, token_id: int, lens: str = "raw") -> xr.Dataset:
    """Per pair: ``logit_left``, ``logit_right`` and ``shift`` (right - left) of one tracked token, lazily."""
    index = _tracked_index(ds, token_id)
    logit = ds.tracked_logit.sel(lens=lens, drop=True).isel(tracked=index, drop=True)
    left, right = select_side(ds, logit, "left"), select_side(ds, logit, "right")
    return xr.Dataset({"logit_left": left, "logit_right": right, "shift": right - left}).assign_attrs(
        token_id=int(token_id), lens=lens)


def tracked_changes(ds: xr.Dataset, threshold: float = 0.5, lens: str = "raw",
                    token_ids: list[int] | None = None) -> xr.DataArray:
    """Shifts (right - left) of tracked tokens with |shift| >= ``threshold``; NaN elsewhere and on padding.

    Dims (token_q, pair, prompt, layer, token); lazy. ``.stack(...).dropna(...)`` lists them.
    """
    ids = [int(t) for t in (token_ids if token_ids is not None else ds.tracked_id.values)]
    shifts = [tracked_trajectory(ds, t, lens)["shift"] for t in ids]
    shift = xr.concat(shifts, dim="token_q", coords="minimal", compat="override").assign_coords(token_q=ids)
    return shift.where(abs(shift) >= threshold).rename("tracked_change").assign_attrs(threshold=threshold)
