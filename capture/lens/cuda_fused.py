"""The lens statistics of a vocabulary chunk in a few fused passes (``torch.compile``), for CUDA.

Axes legend: p = pass, q = pair, n = position, v = vocabulary entry of the chunk,
s = segment of ``capture.lens.vocab_chunks.TOPK_SEGMENT`` entries, c = entry of a candidate segment, k = top-k rank.

After the lens products, the eager torch path (``ChunkState.add_chunk``) runs one
kernel per operation and reads or writes the chunk's logits about 11 times per pass
and 9 per pair, writing ``exp(z - max)`` and every pair's shift as they go; on a GPU
those passes over memory, not the products, set the statistics' pace (48% of the GPU
time in the profile of issue 17). Here two compiled functions do all that touches the
whole chunk: one reads each pass's logits for the segment maxima, the new running
maximum and both exponential sums; one reads each pair's two passes for the KL
numerator and the segment extremes of the shift. Neither the exponentials nor the
shifts are kept. Top-k values are then selected among the entries of the k best
segments only (``capture.lens.vocab_chunks.best_in_segments``, as the eager path does), gathered from
the logits.

Sums are accumulated in float64, as on the other paths. The vocabulary is cut into chunks
of one width, a whole number of segments and at least k of them (:func:`chunk_bounds`); the
last chunk's missing entries are logits of -inf, which add nothing to a sum and are never
selected, so every chunk runs compiled (a 4,480-entry tail of Qwen's vocabulary, or a top-k
above 32, used to send chunks or the whole stage to the eager path).

Compiled once per process with dynamic shapes (about 20 s, then cached on disk by inductor).
Any exception of a compiled call (a backend, Dynamo or Triton launch error: the GPU image may
carry another torch) is raised before the chunk state changes; a warning says why and the rest
of the run takes the eager path. The first block on each device is also computed eagerly and
compared (:func:`self_check`): on a mismatch a warning names both numbers, and the run goes on
eagerly with the eager numbers.
"""

from __future__ import annotations

import functools
import warnings

import torch

from capture.lens.vocab_chunks import TOPK_SEGMENT, ChunkState, _Softmax, best_in_segments, segment_entries
from capture.models.transfer import to_device


def _pass_reductions(z_pnv: torch.Tensor, max_pn: torch.Tensor):
    p, n, v = z_pnv.shape
    seg_max_pns = z_pnv.view(p, n, v // TOPK_SEGMENT, TOPK_SEGMENT).amax(-1)
    new_max_pn = torch.maximum(max_pn, seg_max_pns.amax(-1))
    x_pnv = z_pnv - new_max_pn[:, :, None]
    e_pnv = torch.exp(x_pnv)
    ex_pnv = torch.where(e_pnv > 0, e_pnv * x_pnv, 0.0)  # a padded entry: 0 x -inf, which is NaN, counts 0
    return new_max_pn, seg_max_pns, e_pnv.to(torch.float64).sum(-1), ex_pnv.to(torch.float64).sum(-1)


def _pair_reductions(z_pnv: torch.Tensor, new_max_pn: torch.Tensor, left_q: torch.Tensor, right_q: torch.Tensor):
    q, (_, n, v) = left_q.shape[0], z_pnv.shape
    z_right = z_pnv[right_q]
    shift_qnv = z_right - z_pnv[left_q]  # NaN at padded entries (-inf - -inf)
    e_right = torch.exp(z_right - new_max_pn[right_q][:, :, None])
    kl_qnv = torch.where(e_right > 0, e_right * shift_qnv, 0.0)
    padded = torch.isnan(shift_qnv)
    rise = torch.where(padded, -torch.inf, shift_qnv).view(q, n, v // TOPK_SEGMENT, TOPK_SEGMENT)
    fall = torch.where(padded, torch.inf, shift_qnv).view(q, n, v // TOPK_SEGMENT, TOPK_SEGMENT)
    return kl_qnv.to(torch.float64).sum(-1), rise.amax(-1), fall.amin(-1)


@functools.cache
def compiled() -> tuple:
    """The two reductions compiled (dynamic shapes: one compilation for every block and chunk size)."""
    return (torch.compile(_pass_reductions, dynamic=True, fullgraph=True),
            torch.compile(_pair_reductions, dynamic=True, fullgraph=True))


_BROKEN: list[str] = []  # set when compilation failed in this process: the eager path from then on


def available(device: torch.device) -> bool:
    """Whether ``torch.compile`` can build kernels for ``device`` (Triton on CUDA) and has not failed here."""
    if _BROKEN:
        return False
    if device.type != "cuda":
        return True  # inductor's C++ backend: what the tests run
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def _failed(error: Exception) -> None:
    """A compiled call failed: say so once and take the eager path (same numbers, slower) for the rest of the run."""
    cause = getattr(error, "inner_exception", None) or error  # what the compiler raised, not dynamo's wrapper
    first_line = (str(cause).strip().splitlines() or [""])[0]
    _BROKEN.append(first_line)
    warnings.warn(f"the fused lens statistics could not be compiled ({type(cause).__name__}: {first_line}); "
                  "using the eager torch path (same numbers, slower)", stacklevel=3)


def chunk_bounds(vocab: int, vocab_chunk: int, k: int) -> tuple[int, list[tuple[int, int]]]:
    """(width, [(start, stop), ...]): chunks of one width, whole segments and at least ``k`` of them (the
    segment selection picks k), as near ``vocab_chunk`` as that allows; the last one may hold fewer entries.

    >>> chunk_bounds(151_936, 16_384, 20)[0], len(chunk_bounds(151_936, 16_384, 20)[1])
    (15232, 10)
    >>> chunk_bounds(50_257, 16_384, 20)[1][-1]
    (38016, 50257)
    """
    n_chunks = -(-vocab // vocab_chunk)
    width = -(-vocab // n_chunks)
    width = max(-(-width // TOPK_SEGMENT), k) * TOPK_SEGMENT
    return width, [(start, min(start + width, vocab)) for start in range(0, vocab, width)]


def add_chunk(state: ChunkState, z_pnv: torch.Tensor, start: int, pair_index: tuple[torch.Tensor, torch.Tensor]):
    """Fold a chunk of logits (whole segments, at least k; entries past the vocabulary -inf) into ``state``, as
    ``state.add_chunk`` would."""
    pass_reductions, pair_reductions = compiled()
    new_max_pn, seg_max_pns, sum_pn, zsum_pn = pass_reductions(z_pnv, state.soft.max_pn)
    if state.pairs:
        kl_part_qn, rise_qns, fall_qns = pair_reductions(z_pnv, new_max_pn, *pair_index)
    # ``state`` changes only from here on, so a compiled call that fails above leaves it as it was.
    rescale_pn = state.soft.move_max(new_max_pn)
    state.soft.add_chunk(sum_pn, zsum_pn)
    k = state.k
    if k:
        for p, top in enumerate(state.tops):
            top.merge(*best_in_segments(lambda s, p=p: segment_entries(z_pnv[p], s), seg_max_pns[p], k, True), start)
    for q, (left, right) in enumerate(state.pairs):
        state.kl_num[q] = state.kl_num[q] * rescale_pn[right] + kl_part_qn[q]
        if k:
            def shift_of(s, a=left, b=right, pad=-torch.inf):
                shift = segment_entries(z_pnv[b], s) - segment_entries(z_pnv[a], s)
                return torch.where(torch.isnan(shift), pad, shift)  # a padded entry is never selected

            state.rises[q].merge(*best_in_segments(shift_of, rise_qns[q], k, True), start)
            state.falls[q].merge(*best_in_segments(lambda s, f=shift_of: f(s, pad=torch.inf), fall_qns[q], k, False),
                                 start)


def _fold(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk, fused: bool):
    """Every chunk of the vocabulary folded into a new state over ``soft``: compiled while ``fused`` and nothing
    has failed, else (and from a failure on) eagerly. Returns the state's results."""
    n, device = h_by_pass[0].shape[0], h_by_pass[0].device
    state = ChunkState.empty(len(h_by_pass), pairs, k, soft)
    pair_index = tuple(to_device(torch.tensor([pair[i] for pair in pairs], dtype=torch.long), device) for i in (0, 1))
    width, bounds = chunk_bounds(vocab, vocab_chunk, k) if fused else \
        (min(vocab_chunk, vocab), [(s, min(s + vocab_chunk, vocab)) for s in range(0, vocab, vocab_chunk)])
    z_pnv = torch.empty(len(h_by_pass), n, width, device=device)
    for start, stop in bounds:
        real = stop - start
        for p, (lens, h) in enumerate(zip(lens_by_pass, h_by_pass, strict=True)):
            lens.logits(h, start, stop, out=z_pnv[p, :, :real])
        if fused and not _BROKEN:
            z_pnv[:, :, real:] = -torch.inf
            try:
                add_chunk(state, z_pnv, start, pair_index)
                continue
            except torch.OutOfMemoryError:
                raise  # the eager path needs more memory, not less
            except Exception as error:  # raised before ``state`` changes; see the module
                _failed(error)
        state.add_chunk(z_pnv[:, :, :real], start)
    return state.results()


_CHECKED: set[str] = set()  # devices whose compiled statistics matched the eager ones in this process


def self_check(fused, fused_soft, eager, eager_soft, rtol: float = 1e-6, atol: float = 1e-6) -> str | None:
    """The first quantity on which the compiled and the eager results of one block differ beyond the accuracy
    tests' tolerance, with both numbers; None when they agree."""
    named = {"softmax sum": (fused_soft.sum_pn, eager_soft.sum_pn), "entropy": (fused_soft.entropy(),
                                                                                eager_soft.entropy()),
             **{f"KL numerator of pair {q}": pair for q, pair in enumerate(zip(fused[0], eager[0], strict=True))},
             "top-k logits": (fused[1][0], eager[1][0]), "rises": (fused[2][0], eager[2][0]),
             "falls": (fused[3][0], eager[3][0])}
    for name, (got, want) in named.items():
        bad = ~torch.isclose(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True)
        if bad.any():
            at = tuple(int(i) for i in bad.nonzero()[0])
            return f"{name} at {at}: {float(got[at]):.9g} compiled, {float(want[at]):.9g} eager"
    return None


def chunks_fused(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk):
    """The chunk loop of :func:`capture.lens.logit_lens.lens_statistics` with the fused chunk statistics; the first
    block on each device is computed both ways and compared (see the module)."""
    device = str(h_by_pass[0].device)
    if _BROKEN or device in _CHECKED:
        return _fold(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk, fused=not _BROKEN)
    eager_soft = _Softmax(soft.max_pn.clone(), soft.sum_pn.clone(), soft.zsum_pn.clone())
    eager = _fold(h_by_pass, lens_by_pass, pairs, k, eager_soft, vocab, vocab_chunk, fused=False)
    fused = _fold(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk, fused=True)
    mismatch = None if _BROKEN else self_check(fused, soft, eager, eager_soft)
    _CHECKED.add(device)
    if mismatch is None and not _BROKEN:
        return fused
    if mismatch is not None:
        _BROKEN.append(mismatch)
        warnings.warn(f"the compiled lens statistics disagree with the eager ones on {device} ({mismatch}); using "
                      "the eager torch path for the rest of the run", stacklevel=2)
    soft.max_pn, soft.sum_pn, soft.zsum_pn = eager_soft.max_pn, eager_soft.sum_pn, eager_soft.zsum_pn
    return eager
