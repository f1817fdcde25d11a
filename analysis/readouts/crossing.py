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
- ``kl_interaction`` (per split): the mean over positions of KL(SS || BB) - KL(B>S@L || BB) - KL(S>B@L || BB),
  the change of the output under both bodies' swaps less the changes under each alone (pairs ``BB-SS``,
  ``BB-B>S@L``, ``BB-S>B@L``): 0 when one side of ``L`` carries the whole change; ``kl_interaction_share`` its
  sum over KL(SS || BB)'s;
- ``tracked_interaction`` (per split and tracked token, with ``--track``): the mean over positions of that
  interaction in the tracked tokens' norm-lens logits at the last layer;
- each share's and mean's 95% bootstrap interval over prompts (``analysis.compute.bootstrap``), ``*_low``,
  ``*_high``.

Positions ``keep`` leaves out (the massive ones, by default in the CLI) count in none of the sums.
Everything is lazy; a store without crossed passes, without the pairs or without the last layer is refused in
one line.
"""

from __future__ import annotations

from functools import partial

import dask.array as da
import numpy as np
import xarray as xr

from analysis.compute.bootstrap import RESAMPLES, SEED, with_intervals
from store.errors import MissingData
from store.schema import CROSSING_TARGET, lens_layers

DIRECTIONS = {"B>S": CROSSING_TARGET["sft"], "S>B": CROSSING_TARGET["base"]}  # direction: the pass to reproduce


def crossing_splits(ds: xr.Dataset) -> list[int]:
    """The split layers whose two crossed passes the store holds."""
    names = {str(p) for p in ds.pass_.values}
    splits = sorted({int(s) for s, lo, up in zip(ds.split_layer.values, ds.lower_body.values, ds.upper_body.values,
                                                  strict=True) if lo != up}) if "split_layer" in ds.coords else []
    return [s for s in splits if all(f"{d}@{s}" in names for d in DIRECTIONS)]


def crossed_pairs(ds: xr.Dataset) -> set[str]:
    """The store's pairs that involve a crossed pass (empty without crossed passes)."""
    if "split_layer" not in ds.coords:
        return set()
    crossed = {str(p) for p, lo, up in zip(ds.pass_.values, ds.lower_body.values, ds.upper_body.values, strict=True)
               if lo != up}
    if not crossed:
        return set()
    from analysis.geometry.metrics import store_pass_pairs

    names, left, right = store_pass_pairs(ds)
    return {q for q, a, b in zip(names, left, right, strict=True) if a in crossed or b in crossed}


def _per_prompt_sums(ds: xr.Dataset, keep: xr.DataArray | None, lens: str) -> xr.Dataset:
    """(split, direction, prompt) sums over positions of each profile statistic, and their references."""
    splits = crossing_splits(ds)
    if not splits:
        raise MissingData(what="crossed passes", fix="capture with --cross-layers SPEC (e.g. 0:24:4)")
    n_blocks = int(ds.attrs.get("models", {}).get("base", {}).get("n_layers", max(int(la) for la in ds.layer.values)))
    real = ds.token < ds.n_tokens
    if keep is not None:
        real = real & keep
    if int(ds.layer.values[-1]) != n_blocks:
        raise MissingData(what=f"the models' last layer ({n_blocks})", fix="capture with it in --layers")
    # per position at the last layer: 3 terms per split (B>S, S>B, interaction), then |SS - BB|^2
    terms = _distance_terms(ds, splits).isel(layer=-1, drop=True).where(real).sum("token").reset_coords(drop=True)
    n_split = len(splits)
    by_split = terms.isel(term=slice(0, 3 * n_split)).data.reshape(n_split, 3, -1)
    dims = ("split", "direction", "prompt")
    sums = {"resid": xr.DataArray(by_split[:, :2], dims=dims, coords={"prompt": ds.prompt.values}),
            "interaction": xr.DataArray(by_split[:, 2], dims=("split", "prompt"), coords={"prompt": ds.prompt.values}),
            "resid_ref": terms.isel(term=-1, drop=True), "n": real.sum("token").reset_coords(drop=True)}
    pairs = [str(q) for q in ds.pair.values] if "pair" in ds.dims else []

    def kl_sums(names: list[str]) -> xr.DataArray | None:  # (split, direction, prompt), None without every pair
        if "kl" not in ds or n_blocks not in lens_layers(ds) or not all(q in pairs for q in names):
            return None
        kl = ds.kl.sel(pair=names, lens=lens, layer=n_blocks).astype("float64").where(real).sum("token")
        return xr.DataArray(kl.reset_coords(drop=True).data.reshape(len(splits), len(DIRECTIONS), -1), dims=dims)

    if "BB-SS" in pairs:
        recovered = kl_sums([f"{d}@{s}-{t}" for s in splits for d, t in DIRECTIONS.items()])
        if recovered is not None:
            sums["kl"] = recovered
            sums["kl_ref"] = ds.kl.sel(pair="BB-SS", lens=lens, layer=n_blocks).astype("float64").where(real) \
                .sum("token").reset_coords(drop=True)
            effects = kl_sums([f"BB-{d}@{s}" for s in splits for d in DIRECTIONS])  # KL(crossed || BB)
            if effects is not None:  # KL(SS || BB) - KL(B>S@L || BB) - KL(S>B@L || BB)
                sums["kl_interaction"] = sums["kl_ref"] - effects.sum("direction")
    if "tracked_logit" in ds and n_blocks in lens_layers(ds) and ds.sizes.get("tracked", 0):
        logits = ds.tracked_logit.sel(lens=lens, layer=n_blocks).astype("float64")
        sums["tracked"] = xr.concat([_interaction(logits, split).where(real).sum("token").reset_coords(drop=True)
                                     for split in splits], "split")
    return xr.Dataset(sums).assign_coords(split=splits, direction=list(DIRECTIONS))


def _terms_of(passes: list[np.ndarray], index: list[tuple[int, int, int]], ref: tuple[int, int]) -> np.ndarray:
    """Per position of one piece of all passes (each (prompt, layer, token, dim)), at its last layer only (NaN
    at the others): for each split (its passes SS, B>S, S>B, BB by ``index``) |SS - B>S|^2, |BB - S>B|^2 and
    |SS - B>S - S>B + BB|^2, then |SS - BB|^2, in float64."""
    ss, bb = (np.asarray(passes[i][:, -1], dtype=np.float64) for i in ref)
    out = np.full((3 * len(index) + 1, *passes[0].shape[:-1]), np.nan)
    for k, (bs, sb, _) in enumerate(index):
        crossed_bs, crossed_sb = (np.asarray(passes[i][:, -1], dtype=np.float64) for i in (bs, sb))
        for j, diff in enumerate((ss - crossed_bs, bb - crossed_sb, ss - crossed_bs - crossed_sb + bb)):
            out[3 * k + j, :, -1] = np.einsum("...d,...d->...", diff, diff)
    out[-1, :, -1] = np.einsum("...d,...d->...", ss - bb, ss - bb)
    return out


def _distance_terms(ds: xr.Dataset, splits: list[int]) -> xr.DataArray:
    """(term, prompt, layer, token) of :func:`_terms_of`, each pass read once (a task per run of prompt chunks
    on a ragged store, as the factorial's terms), lazily."""
    from analysis.compute import ragged_sums

    names = [str(p) for p in ds.pass_.values]
    index = [(names.index(f"B>S@{s}"), names.index(f"S>B@{s}"), s) for s in splits]
    ref = (names.index("SS"), names.index("BB"))
    kernel = partial(_terms_of, index=index, ref=ref)
    n_terms = 3 * len(splits) + 1
    if ragged_sums.applies(ds):
        return ragged_sums.terms_over_runs(ds, kernel, n_terms, "crossing-terms")
    data = ds.resid.transpose("pass_", "prompt", "layer", "token", "dim").data
    blocks = [data[i] for i in range(len(names))]
    terms = da.map_blocks(lambda *xs: kernel(list(xs)), *blocks, dtype=np.float64, drop_axis=3, new_axis=0,
                          chunks=((n_terms,), *blocks[0].chunks[:3]), meta=np.empty((0, 0, 0, 0), np.float64))
    return xr.DataArray(terms, dims=("term", "prompt", "layer", "token"),
                        coords={d: ds[d] for d in ("prompt", "layer", "token")})


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
    # name: (numerator, denominator) per prompt; a share's point is the ratio of the sums, a mean's is NaN
    # where no position counts
    ratios = {"resid_share": (sums.resid, sums.resid_ref), "interaction_share": (sums.interaction, sums.resid_ref)}
    means = {"tracked_interaction": "tracked", "kl": "kl", "kl_interaction": "kl_interaction"}
    ratios |= {name: (sums[var], sums.n) for name, var in means.items() if var in sums}
    if "kl" in sums:
        ratios["kl_share"] = (sums.kl, sums.kl_ref)
    if "kl_interaction" in sums:
        ratios["kl_interaction_share"] = (sums.kl_interaction, sums.kl_ref)
    out = {}
    for name, (num, den) in ratios.items():
        total = den.sum("prompt")
        out[name] = num.sum("prompt") / (total.where(total > 0) if name in means else total)
    profile = with_intervals(xr.Dataset(out), ratios, resamples, seed).assign_attrs(lens=lens)
    if "tracked_interaction" in profile and "tracked_str" in ds.coords:  # the tokens' pieces name them (added once:
        profile = profile.assign_coords(tracked_str=ds.tracked_str.variable)  # a lazy coordinate is never compared)
    return profile
