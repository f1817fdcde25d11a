"""Fused CPU kernels (numba) for the branchy part of the lens statistics.

Running top-k over a vocabulary chunk is a compare per entry and a rare insertion;
in torch it takes a partial sort per chunk, which on the CPU costs more than the
lens product itself. Pair statistics (KL numerator, rises, falls) are fused into one
pass that never materialises the shift ``z_right - z_left``.

Axes legend: p = pass, q = pair, n = position, v = vocabulary entry of the chunk,
k = top-k rank. Top-k arrays are kept sorted, best first: rises and pass top-k
descending, falls ascending. Empty slots hold -FLOAT32_MAX (+FLOAT32_MAX for falls)
and id -1.
Compiled on first use and cached on disk (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

LANES = 16  # entries per (interleaved) block checked before scanning for top-k insertions
# Finite sentinels for empty top-k slots: fastmath kernels may assume no infinities.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@njit(cache=True, inline="always")
def _insert(values, ids, value, vid, descending):  # pragma: no cover - compiled
    k = values.shape[0]
    j = k - 1
    while j > 0 and ((values[j - 1] < value) if descending else (values[j - 1] > value)):
        values[j] = values[j - 1]
        ids[j] = ids[j - 1]
        j -= 1
    values[j] = value
    ids[j] = vid


# 2**-j for j = 0..127: the exponent part of exp, looked up instead of built from bits.
_POW2_NEG = np.ldexp(np.float32(1.0), -np.arange(128)).astype(np.float32)
_LN2_HI, _LN2_LO = np.float32(0.693145751953125), np.float32(1.428606765330187e-06)


@njit(cache=True, fastmath=True, inline="always")
def _exp_nonpositive(x):  # pragma: no cover - compiled
    """exp(x) for x <= 0 in float32 (within 1e-7 relative), vectorisable: no libm call.

    Cody-Waite reduction x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial
    for exp(r) (truncation 5e-9 relative), times 2**n from a table. Below -87 it returns
    exp(-87) ~ 1.6e-38 instead of a smaller number, which no sum can notice.
    """
    x = max(x, np.float32(-87.0))
    n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    return p * _POW2_NEG[np.int64(-n)]


@njit(parallel=True, cache=True, fastmath=True)
def pass_chunk(z_pnv, e_pnv, max_pn, start, sum_pn, zsum_pn, top_val_pnk, top_id_pnk):  # pragma: no cover
    """For each pass and row: write ``e = exp(z - max)`` (``max`` is the row's new running
    maximum), return the chunk's sum(e) and sum(e * (z - max)) accumulated in float64, and
    fold the logits into the running top-k.

    Blocks are interleaved (block b holds entries b, b + stride, ...), so per-block maxima
    and sums accumulate lane by lane with no horizontal reduction in the hot loop.
    """
    n_pass, n, width = z_pnv.shape
    k = top_val_pnk.shape[2]
    stride = width // LANES
    for i in prange(n):
        high_b = np.empty(stride, np.float32)
        sum_b = np.empty(stride, np.float64)
        zsum_b = np.empty(stride, np.float64)
        for p in range(n_pass):
            z, e, m = z_pnv[p, i], e_pnv[p, i], np.float32(max_pn[p, i])
            for b in range(stride):
                high_b[b] = z[b]
                sum_b[b] = 0.0
                zsum_b[b] = 0.0
            for j in range(LANES):
                off = j * stride
                for b in range(stride):
                    x = z[off + b] - m
                    ev = _exp_nonpositive(x)
                    e[off + b] = ev
                    sum_b[b] += np.float64(ev)
                    zsum_b[b] += np.float64(ev * x)
                    high_b[b] = max(high_b[b], z[off + b])
            total = 0.0
            ztotal = 0.0
            for b in range(stride):
                total += sum_b[b]
                ztotal += zsum_b[b]
            for v in range(stride * LANES, width):  # tail
                x = z[v] - m
                ev = _exp_nonpositive(x)
                e[v] = ev
                total += np.float64(ev)
                ztotal += np.float64(ev * x)
            sum_pn[p, i] = total
            zsum_pn[p, i] = ztotal
            if k == 0:
                continue
            vals, ids = top_val_pnk[p, i], top_id_pnk[p, i]
            for b in range(stride):  # rare: only blocks that beat the current k-th entry
                if high_b[b] > vals[k - 1]:
                    for j in range(LANES):
                        v = j * stride + b
                        if z[v] > vals[k - 1]:
                            _insert(vals, ids, z[v], start + v, True)
            for v in range(stride * LANES, width):
                if z[v] > vals[k - 1]:
                    _insert(vals, ids, z[v], start + v, True)


@njit(parallel=True, cache=True, fastmath=True)
def pair_chunk(z_pnv, e_pnv, left_q, right_q, rescale_pn, start, kl_num_qn,
               rise_val_qnk, rise_id_qnk, fall_val_qnk, fall_id_qnk):  # pragma: no cover - compiled
    """Fold a chunk into each pair's KL numerator sum(e_right * shift) and its rises and falls.

    Same interleaved blocks as :func:`pass_chunk`: a vectorised pass accumulates the
    float64 sum and each block's shift extremes; only blocks whose extremes beat the
    current k-th rise or fall are scanned for insertions.
    """
    n = z_pnv.shape[1]
    width = z_pnv.shape[2]
    n_pair = left_q.shape[0]
    k = rise_val_qnk.shape[2]
    stride = width // LANES
    for i in prange(n):
        high_b = np.empty(stride, np.float32)
        low_b = np.empty(stride, np.float32)
        acc_b = np.empty(stride, np.float64)
        for q in range(n_pair):
            z_r, z_l, e_r = z_pnv[right_q[q], i], z_pnv[left_q[q], i], e_pnv[right_q[q], i]
            for b in range(stride):
                high_b[b] = -FLOAT32_MAX
                low_b[b] = FLOAT32_MAX
                acc_b[b] = 0.0
            for j in range(LANES):
                off = j * stride
                for b in range(stride):
                    shift = z_r[off + b] - z_l[off + b]
                    high_b[b] = max(high_b[b], shift)
                    low_b[b] = min(low_b[b], shift)
                    acc_b[b] += np.float64(e_r[off + b] * shift)
            acc = 0.0
            for b in range(stride):
                acc += acc_b[b]
            for v in range(stride * LANES, width):  # tail
                acc += np.float64(e_r[v] * (z_r[v] - z_l[v]))
            kl_num_qn[q, i] = kl_num_qn[q, i] * rescale_pn[right_q[q], i] + acc
            if k == 0:
                continue
            rise_v, rise_i = rise_val_qnk[q, i], rise_id_qnk[q, i]
            fall_v, fall_i = fall_val_qnk[q, i], fall_id_qnk[q, i]
            for b in range(stride):  # rare: only blocks that beat the current k-th entry
                if high_b[b] > rise_v[k - 1]:
                    for j in range(LANES):
                        v = j * stride + b
                        shift = z_r[v] - z_l[v]
                        if shift > rise_v[k - 1]:
                            _insert(rise_v, rise_i, shift, start + v, True)
                if low_b[b] < fall_v[k - 1]:
                    for j in range(LANES):
                        v = j * stride + b
                        shift = z_r[v] - z_l[v]
                        if shift < fall_v[k - 1]:
                            _insert(fall_v, fall_i, shift, start + v, False)
            for v in range(stride * LANES, width):  # tail
                shift = z_r[v] - z_l[v]
                if shift > rise_v[k - 1]:
                    _insert(rise_v, rise_i, shift, start + v, True)
                if shift < fall_v[k - 1]:
                    _insert(fall_v, fall_i, shift, start + v, False)
