"""The statistics stage of a capture: logit-lens statistics from the stored residuals.

It runs after every pass's residuals are written, when both models' lenses are in
memory, and reads the residuals back from the store. Computing from the stored values
(not the in-memory ones) means every statistic is reproducible from the store alone,
and per-pass and per-pair numbers are computed from the same states.

Axes legend: p = pass, q = pair, g = prompt in the group, l = layer, t = token,
d = hidden, n = flattened real (non-padding) position, k = top-k rank, j = tracked.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from capture.lens.logit_lens import Lens, lens_statistics
from capture.models.transfer import DeviceToHost, arrivals, to_device
from capture.plan.budget import lens_read_prompts
from store.chunking import chunk_slices
from store.reader import ArrayRegions
from store.schema import LENS_NAMES, STATISTICS, Statistic
from store.writer import StoreWriter, fault_point

# (rows, vocabulary chunk) per lens product. The CPU kernels want cache-sized chunks; on
# CUDA bigger blocks amortise the launches of the per-chunk torch ops (~1 GB per tensor).
BLOCKS = {"cpu": (1024, 2048), "cuda": (4096, 16384)}


def statistics_blocks(device: torch.device | str) -> tuple[int, int]:
    """(rows per block, vocabulary chunk) of the statistics stage on ``device``."""
    return BLOCKS["cpu" if torch.device(device).type == "cpu" else "cuda"]


def _real_mask_glt(n_tokens_g: np.ndarray, lens_l: np.ndarray, n_tokens: int) -> np.ndarray:
    """The rows computed: real positions at the layers whose statistics are kept (``lens_l``)."""
    real_gt = np.arange(n_tokens)[None, :] < n_tokens_g[:, None]
    return real_gt[:, None, :] & np.asarray(lens_l, dtype=bool)[None, :, None]


def _next_ids_glt(token_id_gt: np.ndarray, n_tokens_g: np.ndarray, n_layers: int) -> np.ndarray:
    """(g, l, t) the stored token that follows each position (the same at every layer), -1 where none is stored:
    a prompt's last stored position.

    >>> _next_ids_glt(np.array([[5, 6, 7], [8, 9, 0]]), np.array([3, 2]), 1)[:, 0]
    array([[ 6,  7, -1],
           [ 9, -1, -1]])
    """
    next_gt = np.full(token_id_gt.shape, -1, dtype=np.int64)
    next_gt[:, :-1] = token_id_gt[:, 1:]
    next_gt[np.arange(token_id_gt.shape[1])[None, :] >= n_tokens_g[:, None] - 1] = -1
    return np.broadcast_to(next_gt[:, None, :], (next_gt.shape[0], n_layers, next_gt.shape[1]))


def _stats_field(stat: Statistic) -> str:
    """The :class:`~capture.lens.logit_lens.LensStats` attribute that computes ``stat``: its stem, then its axes."""
    stem = "tracked" if stat.name == "tracked_logit" else stat.name
    return f"{stem}_{'p' if stat.lead == 'pass_' else 'q'}n{ {None: '', 'k': 'k', 'tracked': 'j'}[stat.tail]}"


# (statistic, LensStats field, lead axis, trailing axis, fill for padding), one per store.schema.STATISTICS
_FIELDS = tuple((s.name, _stats_field(s), s.lead, s.tail, -1 if np.dtype(s.dtype).kind == "i" else np.nan)
                for s in STATISTICS)


def _group_statistics(
    resid_pgltd: np.ndarray, mask_glt: np.ndarray, lenses: list[Lens], pairs: list[tuple[int, int]],
    top_k: int, tracked_ids: list[int], device: torch.device, block_rows: int, vocab_chunk: int,
    on_rows: Callable[[int], None] = lambda n: None, next_glt: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """All statistics of one prompt group as arrays shaped (p or q, lens, g, l, t[, k or j]);
    ``on_rows(n)`` after each block of ``n`` rows (real positions x layers, one lens); ``next_glt`` the token
    that follows each position (:func:`_next_ids_glt`; without it ``target_logprob`` is NaN)."""
    n_pass = resid_pgltd.shape[0]
    real_n = mask_glt.reshape(-1)
    h_pnd = torch.from_numpy(resid_pgltd.reshape(n_pass, real_n.size, -1)[:, real_n])
    next_n = None if next_glt is None else torch.from_numpy(np.ascontiguousarray(next_glt.reshape(-1)[real_n]))
    leads = {"pass_": n_pass, "pair": len(pairs)}
    tails = {None: (), "k": (top_k,), "tracked": (len(tracked_ids),)}
    fields = [f for f in _FIELDS if leads[f[2]] and (f[3] != "tracked" or tracked_ids)]
    out = {
        name: np.full((leads[lead], len(LENS_NAMES), real_n.size, *tails[tail]), fill,
                      np.int32 if fill == -1 else np.float32)
        for name, _, lead, tail, fill in fields
    }
    # Equal row blocks: every block streams the whole unembedding, so a small last block
    # would cost nearly as much as a full one.
    n_rows = h_pnd.shape[1]
    block = -(-n_rows // max(1, -(-n_rows // block_rows)))
    real_rows = np.flatnonzero(real_n)
    copies = DeviceToHost(device)

    def launches():
        for lens_i, lens_name in enumerate(LENS_NAMES):
            for start in range(0, n_rows, block):
                h_by_pass = [to_device(h_pnd[p, start:start + block], device) for p in range(n_pass)]
                if lens_name == "norm":
                    h_by_pass = [lens.apply_norm(h) for lens, h in zip(lenses, h_by_pass, strict=True)]
                next_ids = None if next_n is None else to_device(next_n[start:start + block], device)
                stats = lens_statistics(h_by_pass, lenses, pairs, top_k, tracked_ids, vocab_chunk, next_ids=next_ids)
                copy = copies.start(*(getattr(stats, field) for _, field, *_ in fields))
                yield (lens_i, real_rows[start:start + block]), copy

    # On CUDA each block's results come back while the next block computes (capture.models.transfer).
    for (lens_i, rows), arrays in arrivals(copies, launches()):
        for (name, *_), values in zip(fields, arrays, strict=True):
            out[name][:, lens_i, rows] = values
        on_rows(len(rows))
    return {name: values.reshape(*values.shape[:2], *mask_glt.shape, *values.shape[3:])
            for name, values in out.items()}


def chosen_layers(root) -> np.ndarray:
    """(layer,) bool: the stored layers whose statistics are computed (``--lens-layers``; all without it)."""
    if "lens_layer" in root:
        return np.asarray(root["lens_layer"][...], dtype=bool)
    return np.ones(root["resid"].shape[2], dtype=bool)


def pending_rows(n_tokens_p: np.ndarray, lens_done_p: np.ndarray, n_lens_layers: int) -> int:
    """Rows the statistics stage still has to compute: real positions x lens layers x lenses of the prompts
    not done.

    >>> pending_rows(np.array([3, 2]), np.array([False, True]), 4)
    24
    """
    return int(np.asarray(n_tokens_p)[~np.asarray(lens_done_p, dtype=bool)].sum()) * n_lens_layers * len(LENS_NAMES)


def write_lens_statistics(
    writer: StoreWriter,
    lenses: list[Lens],
    pairs: list[tuple[int, int]],
    top_k: int,
    tracked_ids: list[int],
    groups: list[slice],
    device: torch.device | str = "cpu",
    vocab_chunk: int | None = None,
    on_group: Callable[[slice], None] = lambda group: None,
    on_rows: Callable[[int], None] = lambda n: None,
) -> None:
    """Compute and write the statistics of every prompt group not yet flagged ``lens_done``; ``on_rows`` counts
    the rows (real positions x layers, per lens) as they are computed, for a progress bar with an ETA."""
    block_rows, default_chunk = statistics_blocks(device)
    vocab_chunk = vocab_chunk or default_chunk
    root = writer.group
    n_tokens_p = np.asarray(root["n_tokens"][...])
    lens_l = chosen_layers(root)
    done = np.asarray(root["lens_done"][...], dtype=bool)
    stored = ArrayRegions(writer.path, "resid", writer.storage_options)  # chunk files read directly where local
    for group in groups:
        if done[group].all():
            continue
        # Only the stored part of the group (its longest prompt's token chunks) is read and computed on, a few
        # prompts at a time (a group is a shard row: it can be far larger than what fits as float32 at once).
        extent = writer.group_extent(group)
        shape = stored.array.shape
        step = lens_read_prompts(group.stop - group.start, shape[0], shape[2], extent, shape[4])
        arrays: dict[str, np.ndarray] = {}
        for part in chunk_slices(group.stop, step, group.start):
            resid = np.asarray(stored.read((slice(None), part, slice(None), slice(0, extent), slice(None))),
                               dtype=np.float32)
            mask = _real_mask_glt(n_tokens_p[part], lens_l, extent)
            next_glt = _next_ids_glt(np.asarray(root["token_id"][part, :extent]), n_tokens_p[part], len(lens_l))
            values = _group_statistics(resid, mask, lenses, pairs, top_k, tracked_ids, torch.device(device),
                                       block_rows, vocab_chunk, on_rows, next_glt)
            del resid
            if part == group:  # the usual case, a write group read at once: its results are the group's
                arrays = values
                break
            for name, block in values.items():
                if name not in arrays:
                    fill = -1 if block.dtype.kind == "i" else np.nan
                    arrays[name] = np.full((*block.shape[:2], group.stop - group.start, *block.shape[3:]), fill,
                                           dtype=block.dtype)
                arrays[name][:, :, part.start - group.start:part.stop - group.start] = block
        complete: list[slice] = []
        for index, (name, values) in enumerate(arrays.items()):
            complete = writer.write_staircase(name, (slice(None), slice(None)), group, values)
            if index == 0:
                fault_point("lens")  # testing hook: a crash between a group's arrays and its lens_done flag
        for rows in complete:  # the group, or the shard rows it completes (format 4)
            writer.array("lens_done")[rows] = True
        on_group(group)
