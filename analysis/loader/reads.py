"""The units an activation loader reads: a selection of a store's positions, its (prompt chunk, token chunk)
units, their reads, the shuffle buffer and the normalisation factors (numpy; :mod:`analysis.loader.activations` builds a
loader from them, :mod:`analysis.loader.torch_dataset` iterates them, ``loader-stats`` reads them).

Axes legend: n = row (one real position), m = model axis (a pass, or a layer x pass), d = dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from store.errors import UsageError
from store.location import StorePath
from store.reader import ArrayRegions
from store.units import format_bytes, parse_size

NORM_SAMPLE_ROWS = 8192  # rows the normalisation factors are estimated from


@dataclass(frozen=True)
class Unit:
    """One block of work: store rows ``rows`` x token positions ``tokens``, with the selected cells."""

    rows: slice
    tokens: slice
    keep_pt: np.ndarray  # bool (rows, tokens): the selected positions of the block

    @property
    def n(self) -> int:
        return int(self.keep_pt.sum())


@dataclass
class Selection:
    """What a loader yields: the passes (or pair sides), layers, and the units holding the selected rows."""

    store: StorePath
    storage_options: dict | None
    pass_index: list[int]
    pass_names: list[str]
    layer_index: list[int]
    layer_axis: bool  # a list of layers was asked for: (batch, n_layers, ...)
    difference: bool  # pair mode: right - left
    dim: int
    units: list[Unit]
    labels_p: np.ndarray  # store row -> prompt label (source position)
    chunk_bytes: int  # bytes of one unit read (all passes)
    layer_chunk: int = 1  # the store's layer chunk: a unit reads each layer chunk it needs once
    excluded_massive: int = 0
    scales: np.ndarray | None = field(default=None)  # (n_layers, n_passes) multipliers

    @property
    def n_rows(self) -> int:
        return sum(u.n for u in self.units)

    @property
    def row_shape(self) -> tuple[int, ...]:
        lead = (len(self.layer_index),) if self.layer_axis else ()
        return (*lead, self.dim) if self.difference else (*lead, len(self.pass_index), self.dim)


def _selected_positions(ds: xr.Dataset, positions, include_massive: bool, massive_factor: float,
                        kinds: Sequence[str] | None, roles: Sequence[str] | None) -> tuple[np.ndarray, int]:
    """(prompt, token) bool mask of the selected real positions, and how many massive ones were left out."""
    n_tokens = np.asarray(ds.n_tokens.values)
    token = np.arange(ds.sizes["token"])[None, :]
    keep = token < n_tokens[:, None]
    if positions != "all":
        if not isinstance(positions, int) or positions < 1:
            raise UsageError(f"positions must be 'all' or a positive number of first positions, got {positions!r}")
        keep &= token < positions
    excluded = 0
    if not include_massive:
        from analysis.geometry.outliers import massive_positions

        massive = np.asarray(massive_positions(ds, massive_factor).massive.values) & keep
        excluded = int(massive.sum())
        keep &= ~massive
    if kinds is not None:
        from analysis.readouts.tokens import token_kinds

        keep &= np.isin(np.asarray(token_kinds(ds).values), list(kinds))
    if roles is not None:
        if "role" not in ds.coords:
            raise UsageError("roles needs a store captured with a chat template (it has no role coordinate); "
                             "drop roles=")
        keep &= np.isin(np.asarray(ds.role.values), list(roles))
    return keep, excluded


def _passes_or_pair(ds: xr.Dataset, passes, pair) -> tuple[list[str], bool]:
    names = [str(p) for p in ds.pass_.values]
    if pair is not None:
        if passes is not None:
            raise UsageError("give passes= (crosscoder layout) or pair= (differences), not both")
        sides = str(pair).split("-")
        if len(sides) != 2:
            raise UsageError(f"pair must be LEFT-RIGHT such as BB-SS, got {pair!r}")
        chosen, difference = sides, True
    else:
        chosen, difference = list(passes or ("BB", "SS")), False
    unknown = [p for p in chosen if p not in names]
    if unknown:
        raise UsageError(f"pass {unknown[0]!r} is not in this store (it has {', '.join(names)})")
    return chosen, difference


def select(store: StorePath, layer, passes=None, pair=None, positions="all", include_massive: bool = False,
           massive_factor: float = 10.0, kinds=None, roles=None, storage_options: dict | None = None) -> Selection:
    """The :class:`Selection` of a loader (no torch; reads only labels, and norms for the massive positions)."""
    from store.reader import open_store

    ds = open_store(store, storage_options)
    if "resid" not in ds:
        raise UsageError(f"{store} holds no residuals (resid); capture them to train on them")
    chosen, difference = _passes_or_pair(ds, passes, pair)
    if "done" in ds and not bool(np.asarray(ds.done.sel(pass_=chosen).values).all()):
        raise UsageError(f"{store}: the capture of passes {', '.join(chosen)} is not complete (unwritten regions read "
                         "as NaN); rerun the capture command to finish it")
    layers = [layer] if isinstance(layer, (int, np.integer)) else list(layer)
    stored = [int(x) for x in ds.layer.values]
    missing = [x for x in layers if x not in stored]
    if missing or not layers:
        raise UsageError(f"layer {missing[0] if missing else layers!r} is not stored "
                         f"(layers {stored[0]}..{stored[-1]}): pick one of those")
    keep_pt, excluded = _selected_positions(ds, positions, include_massive, massive_factor, kinds, roles)
    var = ds.resid
    chunks = dict(zip(var.dims, var.chunks, strict=True)) if var.chunks else {d: (n,) for d, n in var.sizes.items()}
    units, row = [], 0
    for n_rows in chunks["prompt"]:
        tok = 0
        for n_tok in chunks["token"]:
            block = keep_pt[row:row + n_rows, tok:tok + n_tok]
            if block.any():  # blocks with nothing selected (padding-only chunks among them) are never read
                units.append(Unit(slice(row, row + n_rows), slice(tok, tok + n_tok), block.copy()))
            tok += n_tok
        row += n_rows
    layer_chunk = chunks["layer"][0]
    n_layer_chunks = len({stored.index(x) // layer_chunk for x in layers})
    chunk_bytes = (len(chosen) * n_layer_chunks * max(chunks["prompt"]) * layer_chunk * max(chunks["token"])
                   * ds.sizes["dim"] * var.dtype.itemsize)
    index = {p: i for i, p in enumerate(str(x) for x in ds.pass_.values)}
    return Selection(store=store, storage_options=storage_options, pass_index=[index[p] for p in chosen],
                     pass_names=chosen, layer_index=[stored.index(x) for x in layers],
                     layer_axis=not isinstance(layer, (int, np.integer)), difference=difference, dim=ds.sizes["dim"],
                     units=units, labels_p=np.asarray(ds.prompt.values), chunk_bytes=chunk_bytes,
                     layer_chunk=layer_chunk, excluded_massive=excluded)


def read_unit(resid: ArrayRegions, sel: Selection, unit: Unit) -> np.ndarray:
    """The selected rows of one unit, float32: (n, n_layers, n_passes, dim), store order (row, token).

    Per pass, each layer chunk holding selected layers is read once, from its first to its last
    selected layer (a local store reads it straight from its chunk files).
    """
    out = np.empty((unit.n, len(sel.layer_index), len(sel.pass_index), sel.dim), dtype=np.float32)
    by_chunk: dict[int, list[tuple[int, int]]] = {}  # layer chunk -> (position in the output, layer)
    for j, layer in enumerate(sel.layer_index):
        by_chunk.setdefault(layer // sel.layer_chunk, []).append((j, layer))
    for i, p in enumerate(sel.pass_index):
        for picks in by_chunk.values():
            low, high = min(x for _, x in picks), max(x for _, x in picks) + 1
            block = resid.read((slice(p, p + 1), unit.rows, slice(low, high), unit.tokens, slice(None)))[0]
            for j, layer in picks:  # block: (rows, layers low..high, tokens, dim)
                out[:, j, i] = block[:, layer - low][unit.keep_pt]  # widened to float32 on assignment
    return out


def unit_positions(sel: Selection, unit: Unit) -> np.ndarray:
    """(n, 2) int64: each selected row's prompt label and token position, in :func:`read_unit`'s order."""
    rows, tokens = np.nonzero(unit.keep_pt)
    return np.stack([sel.labels_p[rows + unit.rows.start], tokens + unit.tokens.start], axis=1).astype(np.int64)


def shape_rows(sel: Selection, rows_nlmd: np.ndarray) -> np.ndarray:
    """Apply scales and the layout: differences and the layer axis (see the module docstring)."""
    if sel.scales is not None:
        rows_nlmd = rows_nlmd * sel.scales[None, :, :, None]
    if sel.difference:
        rows_nlmd = rows_nlmd[:, :, 1:2] - rows_nlmd[:, :, 0:1]
    if not sel.layer_axis:
        rows_nlmd = rows_nlmd[:, 0]
    if sel.difference:
        rows_nlmd = rows_nlmd[..., 0, :]
    return np.ascontiguousarray(rows_nlmd, dtype=np.float32)


def norm_scales(resid, sel: Selection, seed: int) -> np.ndarray:
    """Per (layer, pass) factors that bring the mean row norm to sqrt(dim), from up to ``NORM_SAMPLE_ROWS``
    rows of units drawn with ``seed``."""
    rng = np.random.default_rng([seed, 7])
    total, norms = 0, []
    for i in rng.permutation(len(sel.units)):
        rows = read_unit(resid, sel, sel.units[i])
        norms.append(np.linalg.norm(rows.astype(np.float64), axis=-1))
        total += len(rows)
        if total >= NORM_SAMPLE_ROWS:
            break
    mean = np.concatenate(norms).mean(axis=0)  # (layers, passes)
    return (math.sqrt(sel.dim) / np.maximum(mean, 1e-12)).astype(np.float32)


def shard_units(n_units: int, seed: int, epoch: int, shuffle: bool, shard: int, n_shards: int) -> list[int]:
    """The units of one shard, in the order it reads them: one permutation per (seed, epoch), dealt round-robin.

    >>> sorted(shard_units(10, 0, 0, True, 0, 2) + shard_units(10, 0, 0, True, 1, 2))
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_units) if shuffle else np.arange(n_units)
    return order[shard::n_shards].tolist()


def shuffled_batches(chunks: Iterator[tuple[np.ndarray, np.ndarray]], capacity: int, batch_size: int,
                     rng: np.random.Generator | None, drop_last: bool = False
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of rows mixed in a buffer of ``capacity`` rows that the ``(rows, positions)`` chunks fill.

    The buffer fills with whole chunks (units arrive in a random order already), is permuted,
    and gives out its full batches; the rows short of a batch stay for the next fill. Each row
    is copied in once and out once (no per-batch compaction); every row comes out exactly once;
    memory is the buffer plus the chunk being added. ``rng=None`` keeps the rows in the order
    they came (with ``capacity = batch_size``: batches cut straight from the chunks).
    """
    buffer = positions = None
    filled = 0

    def drain(final: bool):
        nonlocal filled
        order = rng.permutation(filled) if rng is not None else np.arange(filled)
        whole = len(order) if final else len(order) // batch_size * batch_size
        for start in range(0, whole, batch_size):
            picked = order[start:start + batch_size]
            if len(picked) < batch_size and drop_last:
                break
            yield buffer[picked], positions[picked]
        rest = order[whole:]
        buffer[:len(rest)], positions[:len(rest)] = buffer[rest], positions[rest]
        filled = len(rest)

    for rows, where in chunks:
        if buffer is None:
            buffer = np.empty((capacity, *rows.shape[1:]), dtype=rows.dtype)
            positions = np.empty((capacity, *where.shape[1:]), dtype=where.dtype)
        at = 0
        while at < len(rows):
            take = min(capacity - filled, len(rows) - at)
            buffer[filled:filled + take], positions[filled:filled + take] = rows[at:at + take], where[at:at + take]
            filled, at = filled + take, at + take
            if filled == capacity:
                yield from drain(final=False)
    if buffer is not None:
        yield from drain(final=True)


def buffer_rows(sel: Selection, shuffle_buffer, batch_size: int) -> int:
    """Rows the shuffle buffer holds within ``shuffle_buffer`` bytes (at least one batch)."""
    budget = parse_size(shuffle_buffer, "shuffle_buffer")
    row_bytes = 4 * int(np.prod(sel.row_shape))  # rows are buffered as yielded, float32
    rows = budget // row_bytes
    if rows < batch_size:
        raise UsageError(f"shuffle_buffer {format_bytes(budget)} holds {rows} rows, fewer than one batch of "
                         f"{batch_size}: give at least {format_bytes(batch_size * row_bytes)}")
    return int(rows)


def open_resid(sel: Selection) -> ArrayRegions:
    """The store's ``resid`` for :func:`read_unit` (picklable: each DataLoader worker reopens it)."""
    return ArrayRegions(sel.store, "resid", sel.storage_options)
