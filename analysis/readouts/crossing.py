"""Where in depth the fine-tuning change enters: the profile of a store's crossed passes (``--cross-layers``).

At each split ``L``, ``B>S@L`` runs the base model below ``L`` and the SFT model from ``L`` on; if it still
behaves as SS, the change lives above ``L``. Per split and direction, at the models' last layer:

- ``kl``: the mean over real positions of KL(SS || B>S@L) (direction ``B>S``) or KL(BB || S>B@L) (``S>B``),
  under the norm lens (the models' output), from the stored pair statistics ``B>S@L-SS`` and ``S>B@L-BB``;
- ``kl_share``: that KL summed over positions, over KL(SS || BB) summed over the same positions (pair
  ``BB-SS``): the share of the output change the crossing leaves; ``1 - kl_share`` is recovered;
- ``resid_share``: sum over positions of ||h_target - h_crossed||^2 over ||h_SS - h_BB||^2, the residuals at the
  last layer (target SS for ``B>S``, BB for ``S>B``);
- ``interaction_share`` (per split): sum of ||SS - B>S@L - S>B@L + BB||^2 over ||h_SS - h_BB||^2, the 2x2 of lower
  x upper body at ``L`` (0 when the change below ``L`` and the change above it add up);
- ``tracked_interaction`` (per split and tracked token, with ``--track``): the mean over positions of that
  interaction in the tracked tokens' norm-lens logits at the last layer;
- each share's and mean's 95% bootstrap interval over prompts (``analysis.compute.bootstrap``), ``*_low``,
  ``*_high``.

Positions ``keep`` leaves out (the massive ones, by default in the CLI) count in none of the sums.
Everything is lazy; a store without crossed passes, without the pairs or without the last layer is refused in
one line.
"""

from __future__ import annotations

import xarray as xr

from analysis.compute.bootstrap import RESAMPLES, SEED, ratio_interval
from store.errors import MissingData
from store.schema import lens_layers

DIRECTIONS = {"B>S": ("SS", "sft"), "S>B": ("BB", "base")}  # direction: (the pass it should recover, upper body)


def crossing_splits(ds: xr.Dataset) -> list[int]:
    """The split layers whose two crossed passes the store holds."""
    names = {str(p) for p in ds.pass_.values}
    splits = sorted({int(s) for s, lo, up in zip(ds.split_layer.values, ds.lower_body.values, ds.upper_body.values,
                                                  strict=True) if lo != up}) if "split_layer" in ds.coords else []
    return [s for s in splits if all(f"{d}@{s}" in names for d in DIRECTIONS)]


def _per_prompt_sums(ds: xr.Dataset, keep: xr.DataArray | None, lens: str) -> xr.Dataset:
    """(split, direction, prompt) sums over positions of each profile statistic, and their references."""
    splits = crossing_splits(ds)
    if not splits:
        raise MissingData(what="crossed passes", fix="capture with --cross-layers SPEC (e.g. 0:24:4)")
    n_blocks = int(ds.attrs.get("models", {}).get("base", {}).get("n_layers", max(int(la) for la in ds.layer.values)))
    if n_blocks not in [int(la) for la in ds.layer.values]:
        raise MissingData(what=f"the models' last layer ({n_blocks})", fix="capture with it in --layers")
    real = ds.token < ds.n_tokens
    if keep is not None:
        real = real & keep
    out: dict[str, list] = {"kl": [], "resid": []}
    last = ds.resid.sel(layer=n_blocks).astype("float64")
    pairs = [str(q) for q in ds.pair.values] if "pair" in ds.dims else []
    for split in splits:
        kl_row, resid_row = [], []
        for direction, (target, _) in DIRECTIONS.items():
            crossed = f"{direction}@{split}"
            diff = last.sel(pass_=target) - last.sel(pass_=crossed)
            resid_row.append((diff * diff).sum("dim").where(real).sum("token").reset_coords(drop=True))
            pair = f"{crossed}-{target}"
            if "kl" in ds and pair in pairs and n_blocks in lens_layers(ds):
                kl_row.append(ds.kl.sel(pair=pair, lens=lens, layer=n_blocks).astype("float64")
                              .where(real).sum("token").reset_coords(drop=True))
        out["resid"].append(xr.concat(resid_row, "direction"))
        if len(kl_row) == len(DIRECTIONS):
            out["kl"].append(xr.concat(kl_row, "direction"))
    ref = last.sel(pass_="SS") - last.sel(pass_="BB")
    # the 2x2 of lower x upper body at each split: SS - B>S@L - S>B@L + BB (0 when the two changes add up)
    inter = [_interaction(last, split) for split in splits]
    sums = {"resid": xr.concat(out["resid"], "split"),
            "interaction": xr.concat([(d * d).sum("dim").where(real).sum("token").reset_coords(drop=True)
                                      for d in inter], "split"),
            "resid_ref": (ref * ref).sum("dim").where(real).sum("token").reset_coords(drop=True),
            "n": real.sum("token").reset_coords(drop=True)}
    if len(out["kl"]) == len(splits) and "BB-SS" in pairs:
        sums["kl"] = xr.concat(out["kl"], "split")
        sums["kl_ref"] = ds.kl.sel(pair="BB-SS", lens=lens, layer=n_blocks).astype("float64").where(real) \
            .sum("token").reset_coords(drop=True)
    if "tracked_logit" in ds and n_blocks in lens_layers(ds) and ds.sizes.get("tracked", 0):
        logits = ds.tracked_logit.sel(lens=lens, layer=n_blocks).astype("float64")
        sums["tracked"] = xr.concat([_interaction(logits, split).where(real).sum("token").reset_coords(drop=True)
                                     for split in splits], "split")
    return xr.Dataset(sums).assign_coords(split=splits, direction=list(DIRECTIONS))


def _interaction(x: xr.DataArray, split: int) -> xr.DataArray:
    """SS - B>S@L - S>B@L + BB of ``x`` (over ``pass_``)."""
    at = {name: x.sel(pass_=name, drop=True) for name in ("SS", f"B>S@{split}", f"S>B@{split}", "BB")}
    return at["SS"] - at[f"B>S@{split}"] - at[f"S>B@{split}"] + at["BB"]


def crossing_profile(ds: xr.Dataset, keep: xr.DataArray | None = None, lens: str = "norm",
                     resamples: int = RESAMPLES, seed: int = SEED) -> xr.Dataset:
    """Per (split, direction): ``kl``, ``kl_share`` and ``resid_share`` with their 95% bootstrap intervals
    (see the module). Lazy. Without lens statistics (``--no-lens``) the KL entries are absent, never 0.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> crossing_profile(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    Traceback (most recent call last):
    ...
    store.errors.MissingData: ...crossed passes...
    """
    sums = _per_prompt_sums(ds, keep, lens)
    out = {"resid_share": sums.resid.sum("prompt") / sums.resid_ref.sum("prompt"),
           "interaction_share": sums.interaction.sum("prompt") / sums.resid_ref.sum("prompt")}
    bounds = {"resid_share": ratio_interval(sums.resid, sums.resid_ref.broadcast_like(sums.resid), resamples, seed),
              "interaction_share": ratio_interval(sums.interaction, sums.resid_ref.broadcast_like(sums.interaction),
                                                  resamples, seed)}
    if "tracked" in sums:
        n = sums.n.sum("prompt")
        out["tracked_interaction"] = sums.tracked.sum("prompt") / n.where(n > 0)
        bounds["tracked_interaction"] = ratio_interval(sums.tracked, sums.n.broadcast_like(sums.tracked), resamples,
                                                       seed)
    if "kl" in sums:
        n = sums.n.sum("prompt")
        out["kl"] = sums.kl.sum("prompt") / n.where(n > 0)
        out["kl_share"] = sums.kl.sum("prompt") / sums.kl_ref.sum("prompt")
        bounds["kl_share"] = ratio_interval(sums.kl, sums.kl_ref.broadcast_like(sums.kl), resamples, seed)
    for name, interval in bounds.items():
        out[f"{name}_low"] = interval.sel(bound="low", drop=True)
        out[f"{name}_high"] = interval.sel(bound="high", drop=True)
    return xr.Dataset(out).assign_attrs(resamples=resamples, seed=seed, lens=lens)
