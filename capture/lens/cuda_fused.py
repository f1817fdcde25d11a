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

Sums are accumulated in float64, as on the other paths. A chunk whose width is not a
whole number of segments, or too narrow for segment selection, takes the eager path:
in real vocabularies that is at most the last chunk. Compiled once per process with
dynamic shapes (about 20 s, then cached on disk by inductor); if compilation fails, a
warning says why and the rest of the run takes the eager path.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch._dynamo.exc

from capture.lens.vocab_chunks import TOPK_SEGMENT, ChunkState, best_in_segments, segment_entries, segment_selectable
from capture.models.transfer import to_device


def _pass_reductions(z_pnv: torch.Tensor, max_pn: torch.Tensor):
    p, n, v = z_pnv.shape
    seg_max_pns = z_pnv.view(p, n, v // TOPK_SEGMENT, TOPK_SEGMENT).amax(-1)
    new_max_pn = torch.maximum(max_pn, seg_max_pns.amax(-1))
    x_pnv = z_pnv - new_max_pn[:, :, None]
    e_pnv = torch.exp(x_pnv)
    return (new_max_pn, seg_max_pns, e_pnv.to(torch.float64).sum(-1),
            (e_pnv * x_pnv).to(torch.float64).sum(-1))


def _pair_reductions(z_pnv: torch.Tensor, new_max_pn: torch.Tensor, left_q: torch.Tensor, right_q: torch.Tensor):
    q, (_, n, v) = left_q.shape[0], z_pnv.shape
    z_right = z_pnv[right_q]
    shift_qnv = z_right - z_pnv[left_q]
    e_right = torch.exp(z_right - new_max_pn[right_q][:, :, None])
    segments = shift_qnv.view(q, n, v // TOPK_SEGMENT, TOPK_SEGMENT)
    return (e_right * shift_qnv).to(torch.float64).sum(-1), segments.amax(-1), segments.amin(-1)


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
    """Compilation failed: say so once and take the eager path (same numbers, slower) for the rest of the run."""
    cause = getattr(error, "inner_exception", None) or error  # what the compiler raised, not dynamo's wrapper
    first_line = (str(cause).strip().splitlines() or [""])[0]
    _BROKEN.append(first_line)
    warnings.warn(f"the fused lens statistics could not be compiled ({type(cause).__name__}: {first_line}); "
                  "using the eager torch path (same numbers, slower)", stacklevel=3)


def add_chunk(state: ChunkState, z_pnv: torch.Tensor, start: int, pair_index: tuple[torch.Tensor, torch.Tensor]):
    """Fold a chunk of logits (``segment_selectable`` by its width) into ``state``, as ``state.add_chunk`` would."""
    pass_reductions, pair_reductions = compiled()
    new_max_pn, seg_max_pns, sum_pn, zsum_pn = pass_reductions(z_pnv, state.soft.max_pn)
    if state.pairs:
        kl_part_qn, rise_qns, fall_qns = pair_reductions(z_pnv, new_max_pn, *pair_index)
    # ``state`` changes only from here on, so a compilation that fails above leaves it as it was.
    rescale_pn = state.soft.move_max(new_max_pn)
    state.soft.add_chunk(sum_pn, zsum_pn)
    k = state.k
    if k:
        for p, top in enumerate(state.tops):
            top.merge(*best_in_segments(lambda s, p=p: segment_entries(z_pnv[p], s), seg_max_pns[p], k, True), start)
    for q, (left, right) in enumerate(state.pairs):
        state.kl_num[q] = state.kl_num[q] * rescale_pn[right] + kl_part_qn[q]
        if k:
            shift_of = lambda s, a=left, b=right: segment_entries(z_pnv[b], s) - segment_entries(z_pnv[a], s)  # noqa: E731
            state.rises[q].merge(*best_in_segments(shift_of, rise_qns[q], k, True), start)
            state.falls[q].merge(*best_in_segments(shift_of, fall_qns[q], k, False), start)


def chunks_fused(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk):
    """The chunk loop of :func:`capture.lens.logit_lens.lens_statistics` with the fused chunk statistics."""
    n, device = h_by_pass[0].shape[0], h_by_pass[0].device
    state = ChunkState.empty(len(h_by_pass), pairs, k, soft)
    pair_index = tuple(to_device(torch.tensor([pair[i] for pair in pairs], dtype=torch.long), device) for i in (0, 1))
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        z_pnv = torch.empty(len(h_by_pass), n, stop - start, device=device)
        for p, (lens, h) in enumerate(zip(lens_by_pass, h_by_pass, strict=True)):
            lens.logits(h, start, stop, out=z_pnv[p])
        if segment_selectable(stop - start, k) and not _BROKEN:
            try:
                add_chunk(state, z_pnv, start, pair_index)
                continue
            except torch._dynamo.exc.BackendCompilerFailed as error:  # raised before ``state`` changes
                _failed(error)
        state.add_chunk(z_pnv, start)
    return state.results()
