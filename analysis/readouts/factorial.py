"""The 2x2 factorial of the four passes: how much of the change is the embeddings, the body, or both.

With h_XY the residual of pass XY (embeddings of X, body of Y), per (prompt, layer, token):

- total change          D = h_SS - h_BB
- embedding main effect E = ((h_SB - h_BB) + (h_SS - h_BS)) / 2
- body main effect      B = ((h_BS - h_BB) + (h_SS - h_SB)) / 2
- interaction           I = h_SS - h_SB - h_BS + h_BB

so that D = E + B exactly, and I = 0 when the two effects add up. Per layer, over real
positions, ``embedding_share`` = sum |E|^2 / sum |D|^2, ``body_share`` = sum |B|^2 / sum |D|^2
and ``cross_share`` = 2 sum <E, B> / sum |D|^2 add up to 1; ``interaction_ratio`` =
sum |I|^2 / sum |D|^2. :func:`tracked_factorial` applies the same four contrasts to
``tracked_logit`` (D = E + B holds for any quantity measured on the four passes).

Axes legend: s = pass (BB, BS, SB, SS), n = position, d = dim. Everything is lazy; the
per-position sums over ``dim`` are float64, padding-only chunks are skipped.
"""

from __future__ import annotations

from functools import partial

import dask.array as da
import numpy as np
import xarray as xr

from analysis.compute import ragged_sums
from analysis.compute.bootstrap import RESAMPLES, SEED, with_intervals
from analysis.compute.reductions import position_sum, prompt_sums
from store.errors import MissingData
from store.reader import is_padding_block

FACTORIAL_PASSES = ("BB", "BS", "SB", "SS")
# Coefficients of (BB, BS, SB, SS) in each effect.
EFFECTS = {
    "total": (-1.0, 0.0, 0.0, 1.0),
    "embedding": (-0.5, -0.5, 0.5, 0.5),
    "body": (-0.5, 0.5, -0.5, 0.5),
    "interaction": (1.0, -1.0, -1.0, 1.0),
}
TERMS = ("total_sq", "embedding_sq", "body_sq", "interaction_sq", "embedding_dot_body")


def _require_passes(ds: xr.Dataset, name: str = "resid") -> list[int]:
    passes = [str(p) for p in ds.pass_.values]
    missing = [p for p in FACTORIAL_PASSES if p not in passes]
    if missing or name not in ds:
        what = f"{name}" if name not in ds else f"pass {', '.join(missing)}"
        raise MissingData(what=what, fix="the factorial needs the four standard passes BB, BS, SB and SS (embeddings "
                          "x body); capture with the default --passes")
    return [passes.index(p) for p in FACTORIAL_PASSES]


def _effects(x_snd: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {name: sum(c * x for c, x in zip(coef, x_snd, strict=True) if c) for name, coef in EFFECTS.items()}


def _block_terms(bb, bs, sb, ss) -> np.ndarray:
    """(5, ...) float64 per-position sums over dim of one tile: |D|^2, |E|^2, |B|^2, |I|^2, <E, B>."""
    shape = bb.shape[:-1]
    if all(is_padding_block(x) for x in (bb, bs, sb, ss)):
        return np.full((len(TERMS), *shape), np.nan)
    effects = _effects([np.asarray(x, dtype=np.float64) for x in (bb, bs, sb, ss)])
    out = np.empty((len(TERMS), *shape))
    for i, name in enumerate(("total", "embedding", "body", "interaction")):
        out[i] = np.einsum("...d,...d->...", effects[name], effects[name])
    out[4] = np.einsum("...d,...d->...", effects["embedding"], effects["body"])
    return out


def _run_terms(passes: list[np.ndarray], index: list[int]) -> np.ndarray:
    """:func:`_block_terms` of a run's piece, a layer at a time (float64 copies of one layer, not of the piece)."""
    bb, bs, sb, ss = (passes[i] for i in index)  # each (prompt, layer, token, dim)
    out = np.empty((len(TERMS), *bb.shape[:-1]))
    for la in range(bb.shape[1]):
        out[:, :, la] = _block_terms(bb[:, la], bs[:, la], sb[:, la], ss[:, la])
    return out


def terms_from_distances(sq: dict[frozenset, xr.DataArray]) -> xr.DataArray:
    """The five :data:`TERMS` from the six squared distances ``|h_i - h_j|^2`` between the four passes, keyed
    by ``frozenset({i, j})``: every term is a quadratic form of the differences from BB, whose inner products
    the distances determine (``<a, b> = (|a|^2 + |b|^2 - |a - b|^2) / 2``). Linear in the distances, so it
    applies to their sums over positions as well, which is how :mod:`analysis.report.summary` gets the factorial from
    the pair sums a report computes anyway (no second read). Per position, the direct sums of
    :func:`factorial_terms` are exact where these may cancel; summed over a layer the difference is rounding.
    """
    def dist(i: str, j: str) -> xr.DataArray:
        return sq[frozenset((i, j))]

    aa, bb, cc = dist("BB", "BS"), dist("BB", "SB"), dist("BB", "SS")  # a = BS - BB, b = SB - BB, c = SS - BB
    ab = (aa + bb - dist("BS", "SB")) / 2
    ac = (aa + cc - dist("BS", "SS")) / 2
    bc = (bb + cc - dist("SB", "SS")) / 2
    terms = {
        "total_sq": cc,
        "embedding_sq": (aa + bb + cc + 2 * bc - 2 * ab - 2 * ac) / 4,  # E = (b + c - a) / 2
        "body_sq": (aa + bb + cc + 2 * ac - 2 * ab - 2 * bc) / 4,  # B = (a + c - b) / 2
        "interaction_sq": aa + bb + cc - 2 * ac - 2 * bc + 2 * ab,  # I = c - a - b
        "embedding_dot_body": (2 * ab + cc - aa - bb) / 4,
    }
    return xr.concat([terms[t] for t in TERMS], dim="term").assign_coords(term=list(TERMS))


def factorial_terms(ds: xr.Dataset) -> xr.DataArray:
    """The five per-position sums ``term`` x (prompt, layer, token), lazily (NaN on padding)."""
    index = _require_passes(ds)
    if ragged_sums.applies(ds):  # a task per run of real chunks, read straight from the chunk files
        terms = ragged_sums.terms_over_runs(ds, partial(_run_terms, index=index), len(TERMS), "factorial-terms")
        return terms.assign_coords(term=list(TERMS))
    data = ds.resid.transpose("pass_", "prompt", "layer", "token", "dim").data
    blocks = [data[i] for i in index]
    terms = da.map_blocks(_block_terms, *blocks, dtype=np.float64, drop_axis=3, new_axis=0,
                          chunks=((len(TERMS),), *blocks[0].chunks[:3]),
                          meta=np.empty((0, 0, 0, 0), np.float64))
    coords = {d: ds[d] for d in ("prompt", "layer", "token") if d in ds.coords}
    return xr.DataArray(terms, dims=("term", "prompt", "layer", "token"), coords={**coords, "term": list(TERMS)})


def factorial(ds: xr.Dataset) -> xr.Dataset:
    """``total_norm`` |D|, ``embedding_norm`` |E|, ``body_norm`` |B| and ``interaction_norm`` |I| per position.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> f = factorial(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> sorted(f.data_vars), f.total_norm.dims
    (['body_norm', 'embedding_norm', 'interaction_norm', 'total_norm'], ('prompt', 'layer', 'token'))
    """
    terms = factorial_terms(ds)
    names = {"total_norm": "total_sq", "embedding_norm": "embedding_sq", "body_norm": "body_sq",
             "interaction_norm": "interaction_sq"}
    return xr.Dataset({name: np.sqrt(terms.sel(term=term, drop=True)).astype("float32")
                       for name, term in names.items()})


def _shares(sums: xr.Dataset) -> xr.Dataset:
    total = sums.total_sq
    safe = total.where(total > 0)  # a layer where nothing changed has no shares (NaN), not a division by zero
    return xr.Dataset({
        "embedding_share": sums.embedding_sq / safe, "body_share": sums.body_sq / safe,
        "cross_share": 2 * sums.embedding_dot_body / safe, "interaction_ratio": sums.interaction_sq / safe,
        "total_sq": total,
    })


def _pair_distances(ds: xr.Dataset, layout: str = "padded") -> xr.DataArray | None:
    """The squared distances ``|h_right - h_left|^2`` (pair, prompt, layer, token) of the store's pairs when they
    cover the six combinations of the four passes (one read serves the metrics, the massive-activation search
    and the factorial), else None."""
    from analysis.geometry.metrics import _residual_sums, store_pass_pairs

    _require_passes(ds)
    _, left, right = store_pass_pairs(ds)
    have = {frozenset((a, b)) for a, b in zip(left, right, strict=True)}
    if not all(frozenset((a, b)) in have for i, a in enumerate(FACTORIAL_PASSES) for b in FACTORIAL_PASSES[i + 1:]):
        return None
    return _residual_sums(ds, layout)[2]


def _by_pair(sqdiff: xr.DataArray) -> dict[frozenset, xr.DataArray]:
    return {frozenset((str(a), str(b))): sqdiff.isel(pair=q, drop=True)
            for q, (a, b) in enumerate(zip(sqdiff.left.values, sqdiff.right.values, strict=True))}


def position_terms(ds: xr.Dataset) -> xr.DataArray:
    """The per-position terms from the pair sums every pair metric reads (:func:`terms_from_distances`) when the
    store's pairs cover the six combinations of the four passes, else :func:`factorial_terms`."""
    sqdiff = _pair_distances(ds)
    return factorial_terms(ds) if sqdiff is None else terms_from_distances(_by_pair(sqdiff))


def factorial_sums(ds: xr.Dataset, over: tuple[str, ...] = ("prompt", "token"),
                   where: xr.DataArray | None = None, by: str | xr.DataArray | None = None,
                   layout: str = "padded") -> xr.DataArray:
    """The five :data:`TERMS` summed per layer (and per ``by`` group) over the real positions ``where`` keeps:
    (term, [group,] layer), lazily. From the pair distances the terms are linear, so the six distances are
    summed first and the terms formed from the sums (laid out by ``layout``, as
    ``analysis.geometry.metrics.pair_metrics``'s, where the store allows: the same sums)."""
    ragged_sums.check_layout(layout)
    per_position = by is None and (set(over) == {"prompt", "token"} or tuple(over) == ("token",))
    sqdiff = _pair_distances(ds, layout if per_position else "padded")
    values = factorial_terms(ds) if sqdiff is None else sqdiff.reset_coords(["left", "right"], drop=True)

    def summed(x: xr.DataArray, keep: xr.DataArray | None = where) -> xr.DataArray:
        if set(over) == {"prompt", "token"}:  # over real positions only, not the padded layout
            return position_sum(x, np.asarray(ds.n_tokens.values), keep)
        if tuple(over) == ("token",):  # per prompt, as a bootstrap resamples them
            return prompt_sums(x, np.asarray(ds.n_tokens.values), keep)
        return (x if keep is None else x.where(keep)).sum(list(over), skipna=True, min_count=1)

    if by is None:
        sums = summed(values)
    else:
        if isinstance(by, str) and by not in ds.coords:
            raise MissingData(what=f"coordinate {by!r}", fix="group by a coordinate the store has (role needs "
                              "chat prompts or --chat-template), or by kind")
        groups = ds[by].load() if isinstance(by, str) else by
        name = by if isinstance(by, str) else str(by.name or "group")
        labels = sorted(str(g) for g in np.unique(groups.values) if str(g) != "")
        sums = xr.concat([summed(values, groups == label if where is None else (groups == label) & where)
                          for label in labels],
                         dim=name).assign_coords({name: labels})
    if sqdiff is None:
        return sums
    return terms_from_distances(_by_pair(sums.assign_coords(left=sqdiff.left, right=sqdiff.right)))


def factorial_shares(ds: xr.Dataset, over: tuple[str, ...] = ("prompt", "token"),
                     where: xr.DataArray | None = None, by: str | xr.DataArray | None = None,
                     intervals: bool = True, resamples: int = RESAMPLES, seed: int = SEED,
                     layout: str = "padded") -> xr.Dataset:
    """Per layer (and per ``by`` group: a per-token coordinate such as ``role``, or a (prompt, token) array
    of labels such as ``analysis.readouts.tokens.token_kinds(ds)``): the shares of sum |D|^2, over real positions
    (:func:`factorial_sums`).

    ``embedding_share + body_share + cross_share = 1``; ``where`` (a boolean over prompt
    and token, e.g. not a massive-activation position) leaves positions out. Summed over prompts and tokens
    (the default ``over``), each share comes with its 95% bootstrap interval over prompts, ``SHARE_low`` and
    ``SHARE_high`` (``analysis.compute.bootstrap``: ``resamples`` draws seeded by ``seed``, from the
    per-prompt sums), unless ``intervals`` is False. ``layout``: as :func:`factorial_sums`'.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import factorial_shares, open_store
    >>> shares = factorial_shares(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))).compute()
    >>> total = shares.embedding_share + shares.body_share + shares.cross_share
    >>> shares.body_share.dims, bool(np.allclose(total, 1))
    (('layer',), True)
    """
    if not intervals or set(over) != {"prompt", "token"}:
        return _shares(factorial_sums(ds, over, where, by, layout).to_dataset("term"))
    sums_p = factorial_sums(ds, ("token",), where, by, layout).to_dataset("term")  # (term, [group,] prompt, layer)
    # a prompt with no position counted adds 0 (``min_count`` here made dask 2026.8 drop a key when the
    # Dataset was computed with ``dask.compute``)
    shares = _shares(sums_p.sum("prompt"))
    numerators = {"embedding_share": sums_p.embedding_sq, "body_share": sums_p.body_sq,
                  "cross_share": 2 * sums_p.embedding_dot_body, "interaction_ratio": sums_p.interaction_sq}
    return with_intervals(shares, {name: (num, sums_p.total_sq) for name, num in numerators.items()}, resamples,
                          seed)


def tracked_factorial(ds: xr.Dataset, lens: str = "raw") -> xr.Dataset:
    """The factorial effects of each tracked token's lens logit (E, B, I and D themselves, not norms), lazily."""
    index = _require_passes(ds, "tracked_logit")
    logit = ds.tracked_logit.sel(lens=lens, drop=True)
    x = [logit.isel(pass_=i, drop=True) for i in index]
    return xr.Dataset({f"{name}_effect": sum(c * v for c, v in zip(coef, x, strict=True) if c)
                       for name, coef in EFFECTS.items()})
