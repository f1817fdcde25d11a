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

BLOCK = 16  # entries per max/min check before scanning for top-k insertions
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
    """
    n_pass, n, width = z_pnv.shape
    k = top_val_pnk.shape[2]
    n_blocks = (width + BLOCK - 1) // BLOCK
    for i in prange(n):
        high_b = np.empty(n_blocks, np.float32)
        for p in range(n_pass):
            z, e, m = z_pnv[p, i], e_pnv[p, i], np.float32(max_pn[p, i])
            total = 0.0
            ztotal = 0.0
            for v in range(width):  # vectorisable: no branches on the data
                x = z[v] - m
                ev = _exp_nonpositive(x)
                e[v] = ev
                total += np.float64(ev)
                ztotal += np.float64(ev * x)
            for b in range(n_blocks):
                base = b * BLOCK
                high = np.float32(-FLOAT32_MAX)
                for j in range(min(BLOCK, width - base)):
                    high = max(high, z[base + j])
                high_b[b] = high
            sum_pn[p, i] = total
            zsum_pn[p, i] = ztotal
            if k == 0:
                continue
            vals, ids = top_val_pnk[p, i], top_id_pnk[p, i]
            for b in range(n_blocks):  # rare: only blocks that beat the current k-th entry
                if high_b[b] > vals[k - 1]:
                    for v in range(b * BLOCK, min(b * BLOCK + BLOCK, width)):
                        if z[v] > vals[k - 1]:
                            _insert(vals, ids, z[v], start + v, True)




@njit(parallel=True, cache=True, fastmath=True)
def pair_chunk(z_pnv, e_pnv, left_q, right_q, rescale_pn, start, kl_num_qn,
               rise_val_qnk, rise_id_qnk, fall_val_qnk, fall_id_qnk):  # pragma: no cover - compiled
    """Fold a chunk into each pair's KL numerator sum(e_right * shift) and its rises and falls.

    Work goes block by block: a vectorisable pass adds the block to the float64 sum
    and finds its shift extremes; only blocks whose
    extremes beat the current k-th rise or fall are scanned for insertions.
    """
    n = z_pnv.shape[1]
    width = z_pnv.shape[2]
    n_pair = left_q.shape[0]
    k = rise_val_qnk.shape[2]
    n_blocks = (width + BLOCK - 1) // BLOCK
    for i in prange(n):
        high_b = np.empty(n_blocks, np.float32)
        low_b = np.empty(n_blocks, np.float32)
        for q in range(n_pair):
            z_r, z_l, e_r = z_pnv[right_q[q], i], z_pnv[left_q[q], i], e_pnv[right_q[q], i]
            acc = 0.0
            for b in range(n_blocks):  # vectorisable: no branches on the data
                high = np.float32(-FLOAT32_MAX)
                low = np.float32(FLOAT32_MAX)
                base = b * BLOCK
                for j in range(min(BLOCK, width - base)):
                    shift = z_r[base + j] - z_l[base + j]
                    acc += np.float64(e_r[base + j] * shift)
                    high = max(high, shift)
                    low = min(low, shift)
                high_b[b] = high
                low_b[b] = low
            kl_num_qn[q, i] = kl_num_qn[q, i] * rescale_pn[right_q[q], i] + acc
            if k == 0:
                continue
            rise_v, rise_i = rise_val_qnk[q, i], rise_id_qnk[q, i]
            fall_v, fall_i = fall_val_qnk[q, i], fall_id_qnk[q, i]
            for b in range(n_blocks):  # rare: only blocks that beat the current k-th entry
                if high_b[b] > rise_v[k - 1]:
                    for v in range(b * BLOCK, min(b * BLOCK + BLOCK, width)):
                        shift = z_r[v] - z_l[v]
                        if shift > rise_v[k - 1]:
                            _insert(rise_v, rise_i, shift, start + v, True)
                if low_b[b] < fall_v[k - 1]:
                    for v in range(b * BLOCK, min(b * BLOCK + BLOCK, width)):
                        shift = z_r[v] - z_l[v]
                        if shift < fall_v[k - 1]:
                            _insert(fall_v, fall_i, shift, start + v, False)
