"""Gram matrices of every pass pair's differences, each pass read once.

Per pair and layer the spectrum of the difference rows ``h_right - h_left`` (real positions,
massive ones left out) comes from their ``dim x dim`` Gram matrix in float64. Each task reads
a run of prompt chunks (:mod:`analysis.compute.regions`) of all passes together and adds every pair's
Gram, row sum and row count: a pass is read once, whatever the number of pairs it is in.

Passes that are bitwise identical at a layer are found while reading (frozen input embeddings
make SB = BB and SS = BS; at layer 0, the embedding output, BB = BS for any pair): a pair of
identical passes adds nothing, and pairs whose differences are identical or negated share one
product and one accumulated Gram until a block tells them apart (copy on write). The numbers are
exactly those of each pair computed alone.

Massive-activation positions (:func:`analysis.geometry.outliers.peak_ratios` over the same sums of squares
as :func:`analysis.geometry.outliers.massive_positions`) are found from the same reads: a prompt chunk read
in one slab needs no second read; a chunk of longer prompts is read twice, its norms first.

Axes legend: s = pass, q = pair, p = prompt, l = layer, t = token, d = dim, n = kept row.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import dask
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from numba import njit

from analysis.compute.dim_sums import _FAST, _widen_half, residual_sums
from analysis.compute.ragged_sums import LAYOUT
from analysis.compute.regions import materialize, prompt_runs, region, token_slab
from analysis.geometry.outliers import peak_ratios
from store.chunking import TARGET_CHUNK_BYTES
from store.errors import UsageError
from store.reader import direct_regions

_BITS = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_NO_PAIRS = np.zeros(0, dtype=np.int64)


@njit(cache=True, nogil=True)
def _same_layer(a_pltw, b_pltw, layer):  # pragma: no cover - compiled
    # bit patterns of one layer equal? (stops at the first differing row: distinct passes cost nothing)
    for p in range(a_pltw.shape[0]):
        for t in range(a_pltw.shape[2]):
            acc = 0
            for w in range(a_pltw.shape[3]):
                acc |= a_pltw[p, layer, t, w] ^ b_pltw[p, layer, t, w]
            if acc:
                return False
    return True


def _words(x: np.ndarray) -> np.ndarray:
    """``x``'s bits, as 64-bit words along ``dim`` where its rows allow (a quarter of the comparisons of float16)."""
    row = x.shape[-1] * x.dtype.itemsize
    return x.view(np.uint64 if row % 8 == 0 else _BITS[x.dtype.itemsize])


def _squares(passes: list[np.ndarray], class_ls: np.ndarray) -> np.ndarray:
    """(s, p, l, t) sums of squares (:func:`analysis.compute.dim_sums.residual_sums`), once per distinct pass (passes in
    the same class at every layer, :func:`_classes`, are bitwise identical)."""
    done: dict[int, np.ndarray] = {}
    for s, x in enumerate(passes):
        same = next((r for r in done if (class_ls[:, r] == class_ls[:, s]).all()), None)
        done[s] = done[same] if same is not None else residual_sums([x], _NO_PAIRS, _NO_PAIRS)[0]
    return np.stack([done[s] for s in range(len(passes))])


@njit(cache=True, nogil=True, fastmath=_FAST)
def _diff_rows(lo_pltd, hi_pltd, half, layer, kept_pt, out_nd, sum_d):  # pragma: no cover - compiled
    # float64 rows hi - lo at the kept positions of one layer (float16 widened exactly) and their sum; rows
    # with a NaN are left out. Returns how many rows were written.
    n_dim = lo_pltd.shape[3]
    bits_2d = np.empty((2, n_dim), dtype=np.uint32)
    row_2d = bits_2d.view(np.float32)
    sum_d[:] = 0.0
    n = 0
    for p in range(lo_pltd.shape[0]):
        for t in range(lo_pltd.shape[2]):
            if not kept_pt[p, t]:
                continue
            if half:
                _widen_half(lo_pltd[p, layer, t], bits_2d[0], row_2d[0])
                _widen_half(hi_pltd[p, layer, t], bits_2d[1], row_2d[1])
            real = True
            for d in range(n_dim):
                if half:
                    v = np.float64(row_2d[1, d]) - np.float64(row_2d[0, d])
                else:
                    v = np.float64(hi_pltd[p, layer, t, d]) - np.float64(lo_pltd[p, layer, t, d])
                if v != v:
                    real = False
                    break
                out_nd[n, d] = v
            if real:
                for d in range(n_dim):
                    sum_d[d] += out_nd[n, d]
                n += 1
    return n


@njit(cache=True, nogil=True)
def _finite_rows(bits_pltd, exponent, layer, kept_pt):  # pragma: no cover - compiled
    # kept rows of one pass with no NaN or inf (all ``exponent`` bits set): those whose difference with an
    # identical pass is a row of zeros
    n = 0
    for p in range(bits_pltd.shape[0]):
        for t in range(bits_pltd.shape[2]):
            if not kept_pt[p, t]:
                continue
            bad = False
            for d in range(bits_pltd.shape[3]):
                bad |= (bits_pltd[p, layer, t, d] & exponent) == exponent
            n += not bad
    return n


_EXPONENT = {2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000)}


def _new_gram(n_dim: int) -> np.ndarray:
    return np.zeros((n_dim, n_dim), order="F")  # Fortran order: BLAS adds into it in place


@functools.cache
def _blas_syrk():
    """BLAS ``dsyrk`` (SciPy's, through its C interface), called through ctypes: the call releases the GIL
    (``scipy.linalg.blas.dsyrk`` holds it, which serialised the threads' products)."""
    from scipy.linalg import cython_blas

    capsule = cython_blas.__pyx_capi__["dsyrk"]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    address = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
    i, d = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_double)
    return ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, i, i, d, ctypes.c_void_p, i, d,
                            ctypes.c_void_p, i)(address)


def _add_rows(rows_nd: np.ndarray):
    """An update adding ``rows^T rows`` to the upper triangle of a (Fortran-ordered) Gram, in place."""
    assert rows_nd.flags.c_contiguous and rows_nd.dtype == np.float64

    def update(gram: np.ndarray) -> None:
        assert gram.flags.f_contiguous and gram.shape == (rows_nd.shape[1],) * 2
        # rows (n, d) in C order are a (d, n) matrix A in Fortran order: A A^T is the Gram
        n_dim, one = ctypes.c_int(rows_nd.shape[1]), ctypes.c_double(1.0)
        _blas_syrk()(b"U", b"N", n_dim, ctypes.c_int(rows_nd.shape[0]), one, rows_nd.ctypes.data, n_dim, one,
                     gram.ctypes.data, n_dim)

    return update


def _add_gram(other: np.ndarray):
    return lambda gram: np.add(gram, other, out=gram)


class GramSums:
    """Per pair and layer: the float64 Gram of the difference rows (its upper triangle), their sum and count.

    Pairs whose Grams are equal so far share one array (``slot_ql``, -1: still zero);
    :meth:`add` gives each its own copy the first time they receive different additions.
    """

    def __init__(self, n_pair: int, n_layer: int, n_dim: int):
        self.slot_ql = np.full((n_pair, n_layer), -1, dtype=np.int64)
        self.grams: list[np.ndarray] = []
        self.sum_qld = np.zeros((n_pair, n_layer, n_dim))
        self.count_ql = np.zeros((n_pair, n_layer), dtype=np.int64)
        # threads adding at different layers (each under its layer's lock) may make new slots at once
        self._slots = threading.Lock()

    def __getstate__(self) -> dict:  # a task's accumulator travels from a cluster worker: without its lock
        return {k: v for k, v in self.__dict__.items() if k != "_slots"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _slots=threading.Lock())

    def gram(self, q: int, layer: int) -> np.ndarray:
        """The symmetric Gram of pair ``q`` at ``layer``."""
        slot = self.slot_ql[q, layer]
        if slot < 0:
            return np.zeros((self.sum_qld.shape[-1],) * 2)
        upper = np.triu(self.grams[slot])
        return upper + np.triu(upper, 1).T

    def add(self, layer: int, parts: list) -> None:
        """For each ``(pairs, update)`` of ``parts``, apply ``update`` (:func:`_add_rows`, :func:`_add_gram`;
        None: nothing) to those pairs' Grams at ``layer``; pairs in no part get nothing."""
        part_q = np.full(len(self.slot_ql), -1)
        for i, (members, update) in enumerate(parts):
            if update is not None:
                part_q[members] = i
        slot_q = self.slot_ql[:, layer]
        for slot in np.unique(slot_q):
            users = np.flatnonzero(slot_q == slot)
            groups = [users[part_q[users] == i] for i in np.unique(part_q[users])]
            targets = []
            for k, members in enumerate(groups):  # copies first: the shared array is not yet added to
                target = slot
                if k and slot >= 0:
                    target = self._new(self.grams[slot].copy(order="F"))
                    slot_q[members] = target
                targets.append(target)
            for members, target in zip(groups, targets, strict=True):
                if part_q[members[0]] < 0:
                    continue
                if target < 0:
                    target = self._new(_new_gram(self.sum_qld.shape[-1]))
                    slot_q[members] = target
                parts[part_q[members[0]]][1](self.grams[target])

    def merge(self, other: GramSums) -> None:
        """Add another accumulator of the same pairs and layers (a task's, on a cluster)."""
        for layer in range(other.slot_ql.shape[1]):
            slot_q = other.slot_ql[:, layer]
            self.add(layer, [(list(np.flatnonzero(slot_q == s)), _add_gram(other.grams[s]))
                             for s in np.unique(slot_q) if s >= 0])
        self.sum_qld += other.sum_qld
        self.count_ql += other.count_ql

    def _new(self, gram: np.ndarray) -> int:
        with self._slots:
            self.grams.append(gram)
            return len(self.grams) - 1


class _Shared:
    """The accumulator local threads add into, a lock per layer: memory holds one, not one per task."""

    def __init__(self, sums: GramSums):
        self.sums, self.locks = sums, [threading.Lock() for _ in range(sums.slot_ql.shape[1])]


def _classes(passes: list[np.ndarray]) -> np.ndarray:
    """(l, s): per layer, a class per pass, the passes of a class bitwise identical there (numbered in order of
    their first pass)."""
    words = [_words(x) for x in passes]
    class_ls = np.empty((passes[0].shape[1], len(passes)), dtype=np.int64)
    for layer in range(len(class_ls)):
        rep: list[int] = []  # a pass per class
        for s in range(len(passes)):
            same = next((c for c, r in enumerate(rep) if _same_layer(words[r], words[s], layer)), None)
            if same is None:
                rep.append(s)
                same = len(rep) - 1
            class_ls[layer, s] = same
    return class_ls


def _batch(slabs: list[tuple[list[np.ndarray], np.ndarray, np.ndarray]], left_q, right_q,
           into: GramSums | _Shared, first_layer: int = 0) -> None:
    """Add slabs (each: every pass (p, l, t, d), the kept (p, t), :func:`_classes`) a layer at a time from
    ``first_layer`` (tasks start at different layers, so that threads seldom wait for the same layer's lock).

    Pairs whose passes fall in the same classes (:func:`_classes`) have the same difference up to sign:
    one set of rows, one product; the rows of all the slabs go into one product per group of pairs (a few
    hundred rows where a slab of short prompts has a few dozen). Pairs within one class add nothing to their
    Gram (but count their rows).
    """
    n_layer, n_dim = slabs[0][0][0].shape[1], slabs[0][0][0].shape[3]
    half = slabs[0][0][0].dtype == np.float16
    views = [([x.view(_BITS[x.dtype.itemsize]) if half else x for x in passes], class_ls, kept)
             for passes, kept, class_ls in slabs]
    n_rows, sum_d = sum(int(kept.sum()) for _, kept, _ in slabs), np.empty(n_dim)
    buffers: dict[tuple, np.ndarray] = {}  # rows per group of pairs, reused from layer to layer
    sums = into.sums if isinstance(into, _Shared) else into
    for layer in np.roll(np.arange(n_layer), -first_layer):
        groups: dict[tuple, list] = {}  # (pairs, their signs) -> [rows written, their sum]; zero rows: (pairs,)
        for values, class_ls, kept_pt in views:
            class_s = class_ls[layer]
            same: dict[tuple[int, int], list[int]] = {}
            for q, (a, b) in enumerate(zip(left_q, right_q, strict=True)):
                same.setdefault((min(class_s[a], class_s[b]), max(class_s[a], class_s[b])), []).append(q)
            for (lo, hi), members in same.items():
                first = members[0]  # the rows are its difference; the others' are the same or negated
                if lo == hi:  # the same pass on both sides: a zero row wherever the pass is finite
                    entry = groups.setdefault((tuple(members),), [0, None])
                    x = values[left_q[first]]
                    entry[0] += _finite_rows(x.view(_BITS[x.dtype.itemsize]), _EXPONENT[x.dtype.itemsize], layer,
                                             kept_pt)
                    continue
                signs = tuple(1.0 if class_s[left_q[q]] == class_s[left_q[first]] else -1.0 for q in members)
                key = (tuple(members), signs)
                entry = groups.setdefault(key, [0, np.zeros(n_dim)])
                rows_nd = buffers.get(key)
                if rows_nd is None:
                    rows_nd = buffers[key] = np.empty((n_rows, n_dim))
                entry[0] += _diff_rows(values[left_q[first]], values[right_q[first]], half, layer, kept_pt,
                                       rows_nd[entry[0]:], sum_d)
                entry[1] += sum_d
        with into.locks[layer] if isinstance(into, _Shared) else contextlib.nullcontext():
            for key, (n, row_sum) in groups.items():
                signs = key[1] if len(key) > 1 else (0.0,) * len(key[0])
                if n and len(key) > 1:
                    sums.add(layer, [(list(key[0]), _add_rows(buffers[key][:n]))])
                for q, sign in zip(key[0], signs, strict=True):
                    if row_sum is not None:
                        sums.sum_qld[q, layer] += sign * row_sum
                    sums.count_ql[q, layer] += n


def _read(reads: list) -> list[np.ndarray]:
    return [np.ascontiguousarray(materialize(r)[0]) for r in reads]  # each pass (p, l, t, d)


def _massive(squares_splt: np.ndarray, factor: float) -> np.ndarray:
    """(p, t) massive positions of whole prompts, as :func:`analysis.geometry.outliers.massive_positions` finds them."""
    return peak_ratios(squares_splt.transpose(1, 0, 2, 3)) > factor


def batch_bytes(n_pass: int) -> int:
    """Bytes of each pass a task reads before its products: a store chunk's worth, less under a tight
    ``--memory-limit`` (an eighth of it for each thread's batches; more rows per product only save time)."""
    from analysis.compute.scheduler import memory_limit, parallelism

    limit = memory_limit()
    if limit is None:
        return TARGET_CHUNK_BYTES
    return int(min(TARGET_CHUNK_BYTES, max(1 << 20, limit // (8 * parallelism() * n_pass))))


def _run_task(chunks: list, left_q, right_q, factor: float | None, shared: _Shared | None, shape: tuple,
              first_layer: int, batch: int) -> GramSums | None:
    """A run of prompt chunks, each a list of (tokens, reads of every pass, kept (p, t)) slabs, added in batches
    of about ``batch`` bytes per pass (:func:`batch_bytes`); with ``factor``, massive positions are found (a
    chunk of one slab is read once, a longer one twice: its norms first)."""
    into = shared if shared is not None else GramSums(*shape)
    slabs_read, held, rows = [], 0, 0
    for slabs in chunks:
        massive = None
        if factor is not None and len(slabs) > 1:
            squares = [_squares(passes, _classes(passes)) for passes in (_read(reads) for _, reads, _ in slabs)]
            massive = _massive(np.concatenate(squares, axis=-1), factor)
        for tokens, reads, kept_pt in slabs:
            passes = _read(reads)
            class_ls = _classes(passes)
            if factor is not None:
                kept_pt = kept_pt & ~(_massive(_squares(passes, class_ls), factor) if massive is None else
                                      massive[:, tokens])
            if kept_pt.any():
                slabs_read.append((passes, kept_pt, class_ls))
                held, rows = held + passes[0].nbytes, rows + int(kept_pt.sum())
            # a batch holds about ``batch`` bytes of each pass, and as much again in float64 rows for its products
            if held >= batch or rows * shape[0] * shape[2] * 8 >= len(passes) * batch:
                _batch(slabs_read, left_q, right_q, into, first_layer)
                slabs_read, held, rows = [], 0, 0
    if slabs_read:
        _batch(slabs_read, left_q, right_q, into, first_layer)
    return None if shared is not None else into


def layer_tile(ds: xr.Dataset, n_pair: int) -> int:
    """Layers per read of the store: all of them, fewer under ``--memory-limit`` so that the accumulated
    Grams (one per pair and layer at most: pairs share only while their differences agree) and each
    thread's reads and products fit."""
    from analysis.compute.scheduler import cluster_client, memory_limit, parallelism

    n_pass, _, n_layer, n_tokens, n_dim = ds.resid.shape
    limit = memory_limit()
    if limit is None:
        return n_layer
    gram = n_dim * n_dim * 8
    chunk = ds.resid.data.chunksize if hasattr(ds.resid.data, "chunksize") else ds.resid.shape
    slab = chunk[1] * n_tokens * n_layer * n_dim * ds.resid.dtype.itemsize  # a chunk's tokens, all passes
    if direct_regions(ds.resid) is not None:
        slab = min(slab, TARGET_CHUNK_BYTES)
    threads = parallelism()
    # a batch and a slab being read, of every pass, and the batch's float64 rows (as much as the batch at most)
    transient = threads * n_pass * (2 * batch_bytes(n_pass) + slab)
    # on a cluster each task returns its own accumulator, and the client holds a step of them besides its own
    per_layer = n_pair * gram * (1 + (threads if cluster_client() is not None else 0))
    tile = (limit - transient) // per_layer
    if tile < 1:
        raise UsageError(f"--memory-limit {limit / 1e6:.0f} MB is too small to decompose this store: it needs "
                         f"about {(transient + per_layer) / 1e6:.0f} MB (a dim x dim float64 Gram per pair, "
                         "and each thread's reads); raise the limit or choose fewer pairs with --pass-pair")
    return int(min(n_layer, tile))


def pair_grams(ds: xr.Dataset, left_q: np.ndarray, right_q: np.ndarray, layers: slice,
               exclude_pt: np.ndarray | None = None, massive_factor: float | None = None) -> GramSums:
    """Every pair's Grams, row sums and counts at ``layers`` (a slice of the store's layers), one read of each
    pass. ``exclude_pt`` (prompt x token) leaves positions out; ``massive_factor`` also the massive positions,
    found from the same reads (it needs every layer: the caller finds them first for a part of the layers)."""
    from analysis.compute.scheduler import cluster_client, parallelism

    resid = ds.resid.transpose(*LAYOUT)
    if not hasattr(resid.data, "dask"):
        resid = resid.chunk({d: -1 for d in LAYOUT})
    n_pass, _, n_layer, n_tokens, n_dim = resid.shape
    tile = range(n_layer)[layers]
    if massive_factor is not None and len(tile) < n_layer:
        raise UsageError("massive positions are found from every layer; find them first for a part of the layers")
    n_tokens_p = np.asarray(ds.n_tokens.values)
    kept_pt = np.arange(n_tokens)[None, :] < n_tokens_p[:, None]
    if exclude_pt is not None:
        kept_pt &= ~np.asarray(exclude_pt, dtype=bool)
    chunks, itemsize = resid.data.chunks, resid.dtype.itemsize
    direct = direct_regions(resid) is not None
    cell = n_pass * len(tile) * n_dim * itemsize
    tasks = []
    # a task per run of about a batch of each pass (the task holds a batch and one slab being read)
    batch = batch_bytes(n_pass)
    for run in prompt_runs(n_tokens_p, chunks[1][0], chunks[3][0], n_tokens, cell, n_pass * batch):
        work = []
        for rows, extent in zip(run.chunk_rows, run.extents, strict=True):
            slab = token_slab(rows.stop - rows.start, len(tile) * n_dim, itemsize, chunks[3][0], extent, direct)
            work.append([(tokens, [region(resid, {"pass_": slice(s, s + 1), "prompt": rows, "token": tokens,
                                                           "layer": layers}) for s in range(n_pass)],
                                   kept_pt[rows, tokens])
                                  for tokens in (slice(t, min(extent, t + slab)) for t in range(0, extent, slab))])
        tasks.append(work)
    shape = (len(left_q), len(tile), n_dim)
    total = GramSums(*shape)
    shared = None if cluster_client() is not None else _Shared(total)
    name = "pair-grams-" + tokenize(resid.data.name, kept_pt, left_q, right_q, layers, massive_factor,
                                    [len(w) for w in tasks])
    graph = {(name, r): (_run_task, work, left_q, right_q, massive_factor, shared, shape, r * 7 % len(tile), batch)
             for r, work in enumerate(tasks)}
    hlg = HighLevelGraph.from_collections(name, graph, dependencies=[] if direct else [resid.data])
    delayed = [Delayed((name, r), hlg, layer=name) for r in range(len(tasks))]
    step = len(delayed) if shared is not None else parallelism()
    for start in range(0, len(delayed), step):
        for part in dask.compute(*delayed[start:start + step]):
            if part is not None:
                total.merge(part)
    return total
