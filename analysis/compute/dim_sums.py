"""Fused per-position sums over ``dim`` for the geometric metrics, one read of each residual.

Every geometric metric of a pass or a pair is a function of three sums over ``dim``:
``sum h^2`` per pass, and ``sum h_left * h_right`` and ``sum (h_right - h_left)^2``
per pair. Computing them in one loop reads each residual once, where the xarray
expression form read each pass three times (once per pair it is in) and held float32
copies of whole chunks. ``sum (h_right - h_left)^2`` is summed directly, never derived
from the other two, which would cancel catastrophically where the passes nearly agree;
the dot product is derived from it and the squared norms (``2 a.b = |a|^2 + |b|^2 -
|a - b|^2``): its rounding, eps x (|a|^2 + |b|^2), is that of a summed one (about 1e-16
in a cosine), and a fourth loop over ``dim`` per pair cost a quarter of the kernel.

Axes legend: s = pass, q = pair, n = position (prompt x layer x token, flattened),
d = dim. Sums are accumulated in float64 from float32 values (float16 is widened
exactly); NaN (padding) propagates to the position.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from store.reader import is_padding_block

# Reassociation lets LLVM vectorise the sums; NaN and inf semantics are kept (no 'nnan'/'ninf').
_FAST = {"reassoc", "contract", "nsz"}
# float16 bits shifted into float32 position are the value times 2**-112 (subnormals included).
_HALF_SCALE = np.float32(2.0**112)


@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _widen_half(src_d, bits_d, out_d):  # pragma: no cover - compiled
    # numba has no float16 on the CPU; numpy's own conversion is the slowest step of the sums.
    for d in range(src_d.shape[0]):
        h = np.uint32(src_d[d])
        bits = ((h & 0x7FFF) << 13) | ((h & 0x8000) << 16)
        bits_d[d] = bits | (np.uint32(0x7F800000) * np.uint32(((h >> 10) & 0x1F) == 0x1F))  # inf / NaN
    for d in range(out_d.shape[0]):
        out_d[d] = out_d[d] * _HALF_SCALE


@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _square_sum(row_d):  # pragma: no cover - compiled
    # sum h^2 of one widened row, in float64: one loop for every kernel, so they agree to the last bit
    acc = 0.0
    for d in range(row_d.shape[0]):
        v = np.float64(row_d[d])
        acc += v * v
    return acc


@njit(cache=True, nogil=True, fastmath=_FAST)
def _sums(x_snd, half, left_q, right_q, out_rn):  # pragma: no cover - compiled
    # x_snd: a tuple of S arrays (n, d), one per pass, so the passes' chunks are never copied together.
    n_pass = len(x_snd)
    n_rows, n_dim = x_snd[0].shape
    n_pair = left_q.shape[0]
    bits_sd = np.empty((n_pass, n_dim), dtype=np.uint32)
    row_sd = bits_sd.view(np.float32)
    for n in range(n_rows):
        for s in range(n_pass):
            if half:
                _widen_half(x_snd[s][n], bits_sd[s], row_sd[s])
            else:
                for d in range(n_dim):
                    row_sd[s, d] = x_snd[s][n, d]
            out_rn[s, n] = _square_sum(row_sd[s])
        for q in range(n_pair):
            a, b = left_q[q], right_q[q]
            sq = 0.0
            for d in range(n_dim):
                diff = np.float64(row_sd[b, d]) - np.float64(row_sd[a, d])
                sq += diff * diff
            out_rn[n_pass + n_pair + q, n] = sq
            # the dot product from the three sums (2 a.b = |a|^2 + |b|^2 - |a - b|^2), not a fourth loop: its
            # float64 rounding is eps x (|a|^2 + |b|^2), as that of a summed one (identical passes: |a|^2 exactly)
            out_rn[n_pass + q, n] = 0.5 * (out_rn[a, n] + out_rn[b, n] - sq)


def residual_sums(passes: list[np.ndarray], left_q: np.ndarray, right_q: np.ndarray) -> np.ndarray:
    """Sums over the last axis of S same-shaped blocks ``(..., dim)``, one per pass.

    Returns ``(S + 2Q, ...)`` float64: ``sum h^2`` for each of the S passes, then
    ``sum h_left h_right`` for each of the Q pairs, then ``sum (h_right - h_left)^2``.
    float16 is widened to float32 exactly; float64 input is rounded to float32.

    >>> x = [np.array([[3.0, 4.0]]), np.array([[0.0, 1.0]])]  # 2 passes, 1 position, 2 dims
    >>> residual_sums(x, np.array([0]), np.array([1]))[:, 0].tolist()
    [25.0, 1.0, 4.0, 18.0]
    """
    *middle, n_dim = passes[0].shape
    if all(is_padding_block(x) for x in passes):  # a chunk that holds only padding: nothing to sum
        return np.full((len(passes) + 2 * len(left_q), *middle), np.nan)
    n_rows = int(np.prod(middle, dtype=np.int64))
    half = all(x.dtype == np.float16 for x in passes)
    if half:
        x_snd = tuple(np.ascontiguousarray(x).view(np.uint16).reshape(n_rows, n_dim) for x in passes)
    else:
        x_snd = tuple(np.ascontiguousarray(x, dtype=np.float32).reshape(n_rows, n_dim) for x in passes)
    out = np.empty((len(passes) + 2 * len(left_q), n_rows), dtype=np.float64)
    _sums(x_snd, half, np.asarray(left_q, dtype=np.int64), np.asarray(right_q, dtype=np.int64), out)
    return out.reshape(out.shape[0], *middle)


def previous_layer_dots(block: np.ndarray, layer_axis: int) -> np.ndarray:
    """``sum_d h_l h_(l-1)`` for a block holding its whole layer axis, float64; NaN at layer 0 and on padding.

    Returns the block's shape without its last (``dim``) axis.

    >>> h = np.array([[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]])  # 3 layers, 2 dims
    >>> previous_layer_dots(h, 0).tolist()
    [nan, 11.0, 3.5]
    """
    out = np.full(block.shape[:-1], np.nan)
    if is_padding_block(block) or block.shape[layer_axis] < 2:
        return out
    h = np.moveaxis(block, layer_axis, 0).astype(np.float64)  # (layer, ..., dim)
    np.moveaxis(out, layer_axis, 0)[1:] = np.einsum("l...d,l...d->l...", h[1:], h[:-1])
    return out


@njit(cache=True, nogil=True, fastmath=_FAST)
def _kept_sums(x_pltd, half, keep_mpt, slot_l, out_mld, with_sumsq, sumsq_plt):  # pragma: no cover - compiled
    n_prompt, n_layer, n_token, n_dim = x_pltd.shape
    n_mask = keep_mpt.shape[0]
    bits_d = np.empty(n_dim, dtype=np.uint32)
    row_d = bits_d.view(np.float32)
    for p in range(n_prompt):
        for t in range(n_token):
            kept = False
            for m in range(n_mask):
                kept = kept or keep_mpt[m, p, t]
            if not (kept or with_sumsq):
                continue
            for la in range(n_layer):
                j = slot_l[la]
                if j < 0 and not with_sumsq:
                    continue
                src_d = x_pltd[p, la, t]
                if half:
                    _widen_half(src_d, bits_d, row_d)
                else:
                    for d in range(n_dim):
                        row_d[d] = src_d[d]
                if with_sumsq:  # the same sums of squares as the metrics'
                    sumsq_plt[p, la, t] = _square_sum(row_d)
                if j < 0 or not kept:
                    continue
                for m in range(n_mask):
                    if keep_mpt[m, p, t]:
                        for d in range(n_dim):
                            out_mld[m, j, d] += np.float64(row_d[d])


def kept_sums(x_pltd: np.ndarray, keep_mpt: np.ndarray, layers: np.ndarray, sumsq: bool = False):
    """(mask, layer, dim) float64 sums of the vectors of ``x_pltd`` (prompt, layer, token, dim) at the positions
    each mask of ``keep_mpt`` (mask, prompt, token) keeps, at the ``layers`` (indices into x's layer axis).
    Each row is widened once (float16 exactly), whatever the number of masks keeping it. With ``sumsq``, also
    every position's ``sum h^2`` (prompt, layer, token), as :func:`residual_sums` gives it, from the same pass:
    ``(sums, sumsq)``.

    >>> x = np.arange(8, dtype=np.float16).reshape(1, 2, 2, 2)  # 1 prompt, 2 layers, 2 tokens, 2 dims
    >>> kept_sums(x, np.array([[[True, True]], [[False, True]]]), np.array([1])).tolist()
    [[[10.0, 12.0]], [[6.0, 7.0]]]
    >>> kept_sums(x, np.array([[[False, False]]]), np.array([0]), sumsq=True)[1].tolist()
    [[[1.0, 13.0], [41.0, 85.0]]]
    """
    half = x_pltd.dtype == np.float16
    x = np.ascontiguousarray(x_pltd).view(np.uint16) if half else np.ascontiguousarray(x_pltd, dtype=np.float32)
    out = np.zeros((keep_mpt.shape[0], len(layers), x_pltd.shape[-1]))
    slot = np.full(x_pltd.shape[1], -1, dtype=np.int64)
    slot[np.asarray(layers, dtype=np.int64)] = np.arange(len(layers))
    squares = np.full(x_pltd.shape[:3] if sumsq else (0, 0, 0), np.nan)
    _kept_sums(x, half, np.ascontiguousarray(keep_mpt, dtype=np.bool_), slot, out, sumsq, squares)
    return (out, squares) if sumsq else out
