"""Difference readouts: what the mean difference between two passes says in tokens.

For a pair (left, right) and a layer, the mean difference vector delta = mean(h_right - h_left)
over the first k real positions of every prompt (default 5, the Activation Difference Lens
setting, arXiv 2510.13900) and over all real positions, massive-activation positions left
out, is read through each side's normed lens: logits = W_U norm(delta) (the final norm, then
the unembedding, then the head's bias and scaling). The top promoted (largest) and
suppressed (smallest) tokens are reported as text.

The lens comes from the store's saved lens (``capture --save-lens``) or, failing that, from
the models' safetensors checkpoints named in the store's attributes, read with numpy.
No torch, no transformers; token text comes from the checkpoint's ``tokenizer.json``
through the ``tokenizers`` library.

The token distribution shift rate (URIAL, Lin et al. 2023) of a pair is the share of real
positions at which the right pass's top-1 token under the norm lens at the last layer is
not among the left pass's top-3.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from threadpoolctl import threadpool_limits

from analysis.compute.bootstrap import RESAMPLES, SEED, ratio_interval
from store.errors import LensNotSaved, MissingData, UsageError
from store.location import find_model_dir
from store.schema import LensHead, lens_layers, norm_formula

WINDOWS = ("first", "all")


@dataclass
class NumpyLens:
    """One unembedding as numpy arrays: final norm, weight (vocab x dim), bias and head extras."""

    weight_vd: np.ndarray
    bias_v: np.ndarray
    head: LensHead
    norm_weight: np.ndarray
    norm_bias: np.ndarray

    def logits(self, h_nd: np.ndarray) -> np.ndarray:
        """(n, vocab) float64 logits of the rows of ``h_nd``."""
        return self._head(self._normed(h_nd) @ self.weight_vd.T.astype(np.float64) + self.bias_v)

    def _normed(self, h_nd: np.ndarray) -> np.ndarray:
        return norm_formula(self.head.norm_kind, h_nd.astype(np.float64), self.norm_weight, self.norm_bias,
                            self.head.norm_eps, lambda x: x.mean(-1, keepdims=True))

    def _head(self, z):
        return self.head.after_product(z, np.tanh)

    def extremes(self, h_nd: np.ndarray, top: int, rows: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """The ``top`` largest and smallest float64 logits of each row: ``(ids, values)``, each (2, n, top),
        [0] promoted (largest first), [1] suppressed (smallest first).

        Candidates come from one float32 product (half the time of float64's and no float64 copy of the
        vocabulary matrix), a generous margin of them; their logits are then recomputed in float64 and ranked
        as :func:`_top_ids` ranks the full float64 row, so the answer is the float64 one. ``rows`` at a time.
        """
        n, vocab = h_nd.shape[0], self.weight_vd.shape[0]
        top = min(top, vocab)
        margin = min(vocab, 4 * top + 16)
        ids, values = np.zeros((2, n, top), np.int64), np.zeros((2, n, top))
        weight32 = np.asarray(self.weight_vd, dtype=np.float32)
        for start in range(0, n, rows):
            normed = self._normed(h_nd[start:start + rows])
            z32 = normed.astype(np.float32) @ weight32.T + self.bias_v.astype(np.float32)
            for side, sign in enumerate((1.0, -1.0)):
                cand = np.argpartition(sign * z32, vocab - margin, axis=-1)[:, -margin:]
                z = self._head(np.einsum("nd,nkd->nk", normed, self.weight_vd[cand].astype(np.float64))
                               + self.bias_v[cand])
                picked = _top_ids(sign * z, top)
                ids[side, start:start + rows] = np.take_along_axis(cand, picked, axis=-1)
                values[side, start:start + rows] = np.take_along_axis(z, picked, axis=-1)
        return ids, values


def _saved_lens(ds: xr.Dataset, source: str) -> NumpyLens:
    pick = {"source": source}
    return NumpyLens(weight_vd=ds.lens_weight.sel(pick).values, bias_v=ds.lens_bias.sel(pick).values,
                     head=LensHead.from_attrs(ds.attrs["saved_lens"][source], ds.encoding.get("source", "the store")),
                     norm_weight=ds.lens_norm_weight.sel(pick).values, norm_bias=ds.lens_norm_bias.sel(pick).values)


_HEAD_KEYS = ("lm_head.weight",)
_EMBED_KEYS = ("model.embed_tokens.weight", "transformer.wte.weight", "model.language_model.embed_tokens.weight")
_NORM_KEYS = ("model.norm", "transformer.ln_f", "model.language_model.norm")


def checkpoint_norm_kind(config: dict, has_bias: bool) -> str | None:
    """The final norm's formula (a name of ``NORM_KINDS``) from a checkpoint's config and tensors, or None when
    they do not say. A bias or a ``layer_norm_eps``/``layer_norm_epsilon`` means LayerNorm; ``rms_norm_eps`` means
    RMSNorm, with Gemma's ``1 + weight`` in that family. (A capture finds the formula numerically instead, from
    the module itself, and ``--save-lens`` records it; this reads checkpoints without torch.)

    >>> checkpoint_norm_kind({"model_type": "mystery", "layer_norm_eps": 1e-5}, has_bias=False)
    'layernorm'
    >>> checkpoint_norm_kind({"model_type": "gemma2", "rms_norm_eps": 1e-6}, has_bias=False)
    'rmsnorm_unit_offset'
    >>> checkpoint_norm_kind({"model_type": "mystery"}, has_bias=False) is None
    True
    """
    if has_bias or "layer_norm_eps" in config or "layer_norm_epsilon" in config:
        return "layernorm"
    if "rms_norm_eps" in config:
        return "rmsnorm_unit_offset" if str(config.get("model_type", "")).startswith("gemma") else "rmsnorm"
    return None


def _checkpoint_lens(ref: str, recorded: LensHead | None = None) -> NumpyLens:
    """The unembedding of the checkpoint at ``ref``; its head as the capture ``recorded`` it (found numerically on
    the loaded model), else as guessed from the checkpoint's config (stores from before ``lens_heads``)."""
    from safetensors import safe_open

    folder = Path(ref)
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)
    tensors: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as fh:
            for key in fh.keys():
                if key in _HEAD_KEYS + _EMBED_KEYS or key.rsplit(".", 1)[0] in _NORM_KEYS:
                    tensors[key] = fh.get_tensor(key)
    weight = next((tensors[k] for k in _HEAD_KEYS + _EMBED_KEYS if k in tensors), None)
    norm = next((k for k in _NORM_KEYS if f"{k}.weight" in tensors), None)
    if weight is None or norm is None:
        raise LensNotSaved()
    head = recorded or _guessed_head(ref, config, has_bias=f"{norm}.bias" in tensors)
    norm_weight = tensors[f"{norm}.weight"].astype(np.float64)
    return NumpyLens(weight_vd=weight.astype(np.float32), bias_v=np.zeros(len(weight)), head=head,
                     norm_weight=norm_weight, norm_bias=tensors.get(f"{norm}.bias", np.zeros_like(norm_weight)))


def _guessed_head(ref: str, config: dict, has_bias: bool) -> LensHead:
    kind = checkpoint_norm_kind(config, has_bias)
    if kind is None:
        raise UsageError(f"cannot tell which final norm {ref} uses (its config names neither rms_norm_eps nor "
                         "layer_norm_eps); capture with --save-lens, which records the lens as the model computes it")
    eps = config.get("layer_norm_epsilon") or config.get("rms_norm_eps") or config.get("layer_norm_eps") or 1e-6
    multiplier = float(config.get("logit_scale") or 1.0) / float(config.get("logits_scaling") or 1.0)
    return LensHead(kind, float(eps), multiplier, config.get("final_logit_softcapping"))


def load_lenses(ds: xr.Dataset) -> tuple[dict[str, NumpyLens], str]:
    """Each unembedding the passes use, and where it came from (``saved lens`` or ``checkpoints``)."""
    sources = sorted({str(u) for u in ds.unembedding.values})
    if "lens_weight" in ds and "saved_lens" in ds.attrs:
        return {s: _saved_lens(ds, s) for s in sources}, "the store's saved lens"
    models = ds.attrs.get("models", {})
    try:
        dirs = {s: find_model_dir(models[s], ds.encoding.get("source")) for s in sources}
        if not all(dirs.values()):
            raise LensNotSaved()
        heads = ds.attrs.get("lens_heads") or {}
        where = ds.encoding.get("source", "the store")
        return {s: _checkpoint_lens(str(dirs[s]), LensHead.from_attrs(heads[s], where) if s in heads else None)
                for s in sources}, "the models' safetensors checkpoints"
    except (KeyError, OSError, LensNotSaved):
        raise LensNotSaved() from None


def mean_differences(ds: xr.Dataset, k: int = 5, where: xr.DataArray | None = None,
                     layers: list[int] | None = None, massive_factor: float | None = None,
                     windows: tuple[str, ...] = WINDOWS) -> xr.DataArray:
    """(pair, layer, window, dim): the mean of h_right - h_left over the first ``k`` real positions of each
    prompt (window ``first``) and over all real positions (``all``), of ``windows`` (the ``first`` alone reads a
    token chunk per prompt); ``where`` leaves positions out, ``layers`` (labels) restricts the layers;
    ``massive_factor`` leaves out the massive-activation positions found with that factor. Lazy; on a store as
    ``open_store`` gives it, one streamed pass over the chunks (:mod:`analysis.compute.masked_sums`, which finds
    the massive positions as it reads), whose memory follows the run size, not the store.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> ds = open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))
    >>> mean_differences(ds, k=2, layers=[1]).sizes
    Frozen({'pair': 6, 'layer': 1, 'window': 2, 'dim': 8})
    """
    from analysis.compute import masked_sums
    from analysis.geometry.metrics import select_side

    _check_windows(windows)
    if not masked_sums.applies(ds):
        if massive_factor is not None:
            from analysis.geometry.outliers import massive_positions

            ordinary = ~massive_positions(ds, massive_factor).massive
            where = ordinary if where is None else where & ordinary
        return _mean_differences_xarray(ds, k, where, layers).sel(window=list(windows))
    real = np.arange(ds.sizes["token"])[None, :] < np.asarray(ds.n_tokens.values)[:, None]
    if where is not None:
        real = real & np.asarray(where.transpose("prompt", "token").values, dtype=bool)
    first = real & (np.arange(ds.sizes["token"]) < k)[None, :]
    keep = np.stack([{"first": first, "all": real}[w] for w in windows])
    sums = masked_sums.masked_sums(ds, keep, layers, massive_factor)
    means = sums["sum"] / np.maximum(sums["count"], 1)
    means = means.where(sums["count"] > 0)  # no position: no mean
    means = means.rename(mask="window").assign_coords(window=list(windows))
    diff = select_side(ds, means, "right") - select_side(ds, means, "left")
    return diff.transpose("pair", "layer", "window", "dim")


def _check_windows(windows: tuple[str, ...]) -> None:
    unknown = [w for w in windows if w not in WINDOWS]
    if unknown or not windows:
        raise UsageError(f"unknown window {unknown[0] if unknown else 'list (empty)'!r}; windows are "
                         f"{', '.join(WINDOWS)}")


def _mean_differences_xarray(ds: xr.Dataset, k: int, where: xr.DataArray | None,
                             layers: list[int] | None) -> xr.DataArray:
    """:func:`mean_differences` as an xarray expression, for arrays in another layout (e.g. ``open_stores``)."""
    from analysis.geometry.metrics import select_side

    resid = ds.resid.astype("float64")
    if layers is not None:
        resid = resid.sel(layer=list(layers))
    diff = select_side(ds, resid, "right") - select_side(ds, resid, "left")
    real = ds.token < ds.n_tokens
    if where is not None:
        real = real & where
    first = real & (ds.token < k)
    means = [diff.where(mask).mean(["prompt", "token"], skipna=True) for mask in (first, real)]
    return xr.concat(means, dim="window").assign_coords(window=list(WINDOWS)).transpose("pair", "layer", "window",
                                                                                        "dim")


def _top_ids(z: np.ndarray, top: int) -> np.ndarray:
    """The ids of the ``top`` largest values along the last axis, largest first (ties: the larger id first, as a
    reversed stable sort orders them).

    >>> _top_ids(np.array([[1.0, 5.0, 3.0, 5.0]]), 3).tolist()
    [[3, 1, 2]]
    """
    top = min(top, z.shape[-1])
    part = np.argpartition(z, z.shape[-1] - top, axis=-1)[..., -top:]
    # the stable order of (value, id) from the largest down, as np.argsort(z)[..., ::-1] gives it
    order = np.lexsort((part, np.take_along_axis(z, part, axis=-1)), axis=-1)[..., ::-1]
    return np.take_along_axis(part, order, axis=-1)


def diff_lens(ds: xr.Dataset, k: int = 5, top: int = 10, include_massive: bool = False,
              massive: xr.DataArray | None = None, pairs: list[str] | None = None,
              layers: list[int] | None = None, windows: tuple[str, ...] = WINDOWS) -> xr.Dataset:
    """Top promoted and suppressed tokens of each pair's mean difference, per layer and window, read through
    the left and the right pass's normed lens. Computes (the means are small, and read in one streamed pass).
    Where a mean difference is exactly zero, or its window holds no position, there are no tokens: ids -1,
    logits NaN.
    ``massive`` (prompt, token) gives the massive-activation positions when the caller has already found them;
    ``pairs`` and ``layers`` (labels) restrict the result (and the layers read), ``windows`` (of
    :data:`WINDOWS`) the windows (``first`` alone reads a token chunk per prompt).

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import save_identity_lens, write_tiny_store
    >>> from analysis import diff_lens, open_store
    >>> ds = open_store(save_identity_lens(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> result = diff_lens(ds, k=2, top=3, pairs=["BB-SS"])
    >>> result.promoted_id.dims, result.sizes["rank"], result.attrs["lens_source"]
    (('pair', 'layer', 'window', 'side', 'rank'), 3, "the store's saved lens")
    """
    if "resid" not in ds:
        raise MissingData(what="residuals", fix="the difference lens reads the stored residuals")
    if top < 1 or k < 1:
        raise UsageError(f"--top and --k must be at least 1, got {top} and {k}")
    from analysis.geometry.metrics import store_pass_pairs

    have_pairs, have_layers = store_pass_pairs(ds)[0], [int(la) for la in ds.layer.values]
    bad = [q for q in pairs or [] if q not in have_pairs] or [la for la in layers or [] if la not in have_layers]
    if bad:
        what = "pair" if isinstance(bad[0], str) else "layer"
        have = have_pairs if what == "pair" else have_layers
        raise UsageError(f"unknown {what} {bad[0]!r}; the store has {', '.join(map(str, have))}")
    lenses, source = load_lenses(ds)
    top = min(top, *(len(lens.weight_vd) for lens in lenses.values()))  # a vocabulary has only so many tokens
    where, factor = None, None
    if not include_massive:
        if massive is None:  # found while the means are read
            from analysis.geometry.outliers import MASSIVE_FACTOR

            factor = MASSIVE_FACTOR
        else:
            where = ~massive
    deltas = mean_differences(ds, k, where, layers, factor, tuple(windows)).compute()
    if pairs:
        deltas = deltas.sel(pair=list(pairs))
    sides = {"left": deltas.left.values, "right": deltas.right.values}
    passes = {str(p): str(u) for p, u in zip(ds.pass_.values, ds.unembedding.values, strict=True)}
    shape = (deltas.sizes["pair"], deltas.sizes["layer"], deltas.sizes["window"], 2, top)
    ids = {"promoted": np.zeros(shape, np.int64), "suppressed": np.zeros(shape, np.int64)}
    values = {"promoted": np.zeros(shape), "suppressed": np.zeros(shape)}
    # No difference (exactly 0, e.g. the same embeddings at layer 0) or no position in the window: no tokens.
    empty_qlw = np.isnan(deltas.values).any(-1) | (deltas.values == 0).all(-1)
    delta_qlwd = np.nan_to_num(deltas.values)
    # One product per lens over the distinct rows of every (pair, side) it reads (pairs may share their
    # differences exactly); the data are read, so BLAS may use every core.
    for unembedding in sorted(set(passes.values())):
        reads = [(q, s) for q in range(shape[0]) for s, side in enumerate(("left", "right"))
                 if passes[sides[side][q]] == unembedding]
        if not reads:
            continue
        rows = np.concatenate([delta_qlwd[q].reshape(-1, delta_qlwd.shape[-1]) for q, _ in reads])
        distinct, inverse = np.unique(rows, axis=0, return_inverse=True)
        with threadpool_limits(limits=os.cpu_count() or 1):
            top_ids, top_values = lenses[unembedding].extremes(distinct, top)
        top_ids = top_ids[:, inverse.ravel()].reshape(2, len(reads), *shape[1:3], -1)
        top_values = top_values[:, inverse.ravel()].reshape(2, len(reads), *shape[1:3], -1)
        for r, (q, s) in enumerate(reads):
            for k, kind in enumerate(("promoted", "suppressed")):
                ids[kind][q, :, :, s] = top_ids[k, r]
                values[kind][q, :, :, s] = top_values[k, r]
    for kind in ids:
        ids[kind][empty_qlw] = -1
        values[kind][empty_qlw] = np.nan
    dims = ("pair", "layer", "window", "side", "rank")
    return xr.Dataset({f"{kind}_id": (dims, ids[kind]) for kind in ids} |
                      {f"{kind}_logit": (dims, values[kind]) for kind in values},
                      coords={"pair": deltas.pair.values, "layer": deltas.layer.values,
                              "window": deltas.window.values,
                              "side": ["left", "right"], "rank": np.arange(top)}).assign_attrs(
        lens_source=source, k=k, massive_included=include_massive)


def shift_counts(ds: xr.Dataset) -> xr.Dataset:
    """Per prompt: ``shifted`` (pair, prompt), its real positions whose right pass's top-1 norm-lens token at the
    last layer with statistics is not among the left pass's top-3, and ``positions`` (prompt), its real positions
    (0 for a prompt whose statistics were never written). Lazy; :func:`shift_rate` and
    :func:`shift_rate_interval` read the same counts."""
    if "topk_id" not in ds or ds.sizes.get("k", 0) < 3:
        raise MissingData(what="top-3 lens statistics", fix="capture with lens statistics and --top-k 3 or more")
    from analysis.compute import lens_sums
    from analysis.geometry.metrics import select_side, store_pass_pairs

    if lens_sums.applies(ds):  # a task per run of prompt chunks, not per chunk of topk_id
        _, left, right = store_pass_pairs(ds)
        counts = lens_sums.last_layer_counts(ds, list(zip(left, right, strict=True)), [])
        return xr.Dataset({"shifted": counts.isel(count=slice(0, -1)).rename(count="pair")
                           .assign_coords(pair=ds.pair.values), "positions": counts.isel(count=-1, drop=True)})
    top = ds.topk_id.sel(lens="norm", drop=True).sel(layer=lens_layers(ds)[-1], drop=True)
    right_top1 = select_side(ds, top.isel(k=0, drop=True), "right")
    left_top3 = select_side(ds, top.isel(k=slice(0, 3)), "left")
    real = ds.token < ds.n_tokens
    if "lens_done" in ds:  # prompts whose statistics were never written hold fill ids, not tokens
        real = real & ds.lens_done
    shifted = ~(left_top3 == right_top1).any("k")
    return xr.Dataset({"shifted": shifted.where(real).sum("token").reset_coords(drop=True),
                       "positions": real.sum("token").astype(np.float64).reset_coords(drop=True)})


def shift_rate(ds: xr.Dataset) -> xr.DataArray:
    """Per pair: the share of real positions where the right pass's top-1 norm-lens token at the last layer (with
    statistics) is not among the left pass's top-3 (URIAL's token distribution shift). Lazy.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import fill_lens_statistics, write_tiny_store
    >>> from analysis import open_store, shift_rate
    >>> ds = open_store(fill_lens_statistics(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> rate = shift_rate(ds)  # random top-k ids: nearly every position shifts
    >>> rate.dims, bool(((rate >= 0) & (rate <= 1)).all())
    (('pair',), True)
    """
    counts = shift_counts(ds).sum("prompt")
    return (counts.shifted / counts.positions.where(counts.positions > 0)).rename("shift_rate")


def shift_rate_interval(ds: xr.Dataset, resamples: int = RESAMPLES, seed: int = SEED) -> xr.DataArray:
    """Per pair, the 95% bootstrap interval over prompts of :func:`shift_rate` (``bound``: low, high), from the
    per-prompt counts (``analysis.compute.bootstrap``). Lazy."""
    counts = shift_counts(ds)
    return ratio_interval(counts.shifted, counts.positions, resamples, seed)
