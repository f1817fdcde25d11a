"""The vocabulary folded in chunk by chunk: running softmax sums, running top-k through segment extremes,
and the state the torch paths carry from one chunk to the next (:mod:`capture.lens.logit_lens` and the compiled
:mod:`capture.lens.cuda_fused` both build on these; neither imports the other's entry points).

Axes legend: p = pass, n = position, v = vocabulary entry of a chunk, k = top-k slot, s = segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWSUM_GROUP = 16  # entries per float32 partial sum in _rowsum64


def _rowsum64(x_nv: torch.Tensor) -> torch.Tensor:
    """Row sums accumulated in float64 from float32 partial sums of a few entries (cheap, and exact
    enough that KL of nearly equal distributions keeps its digits)."""
    n, width = x_nv.shape
    if width % ROWSUM_GROUP:
        return x_nv.sum(dim=1, dtype=torch.float64)
    return x_nv.view(n, width // ROWSUM_GROUP, ROWSUM_GROUP).sum(dim=2).sum(dim=1, dtype=torch.float64)


TOPK_SEGMENT = 128


def _chunk_topk(x_nv: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_nv.topk(k, dim=1)`` through segment extremes: the same values, and on a GPU far fewer passes.

    Each of the k best entries lies in one of the k segments with the best extremes
    (a segment outside them has k better segments, each holding an entry better than
    everything in it), so a full-width selection is replaced by one reduction, a
    selection over segment extremes and one over k segments. Ids agree with ``topk``'s
    except among exactly equal values, whose order ``topk`` leaves unspecified too.
    """
    n, width = x_nv.shape
    if not segment_selectable(width, k):
        return x_nv.topk(k, dim=1, largest=largest)
    segments = x_nv.view(n, width // TOPK_SEGMENT, TOPK_SEGMENT)
    extremes_ns = segments.amax(dim=2) if largest else segments.amin(dim=2)
    return best_in_segments(lambda s: segment_entries(x_nv, s), extremes_ns, k, largest)


def segment_selectable(width: int, k: int) -> bool:
    """Whether a chunk of ``width`` entries is whole segments with room to select k of them (4k or more)."""
    return width % TOPK_SEGMENT == 0 and width >= 4 * max(k, 1) * TOPK_SEGMENT


def best_in_segments(values_of, extremes_ns: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids within the chunk) of the k best entries, looked for in the k segments with the best
    extremes only; ``values_of(segments_nk)`` gives those segments' entries, (n, k, TOPK_SEGMENT)."""
    n = extremes_ns.shape[0]
    segments_nk = extremes_ns.topk(k, dim=1, largest=largest).indices
    values, at = values_of(segments_nk).reshape(n, k * TOPK_SEGMENT).topk(k, dim=1, largest=largest)
    return values, segments_nk.gather(1, at // TOPK_SEGMENT) * TOPK_SEGMENT + at % TOPK_SEGMENT


def segment_entries(x_nv: torch.Tensor, segments_nk: torch.Tensor) -> torch.Tensor:
    """The entries of the chosen segments of each row, (n, k, TOPK_SEGMENT)."""
    n, width = x_nv.shape
    k = segments_nk.shape[1]
    return x_nv.view(n, width // TOPK_SEGMENT, TOPK_SEGMENT).gather(
        1, segments_nk[:, :, None].expand(n, k, TOPK_SEGMENT))


@dataclass
class _TopK:
    """Running top-k (values and vocabulary ids, best first) merged chunk by chunk (torch path)."""

    k: int
    largest: bool = True
    values_nk: torch.Tensor | None = None
    ids_nk: torch.Tensor | None = None

    def update(self, chunk_nv: torch.Tensor, start: int) -> None:
        self.merge(*_chunk_topk(chunk_nv, min(self.k, chunk_nv.shape[1]), self.largest), start)

    def merge(self, vals: torch.Tensor, idx: torch.Tensor, start: int) -> None:
        """Fold a chunk's own top-k (values, ids within the chunk, which starts at ``start``) in."""
        idx = idx + start
        if self.values_nk is not None:
            vals, order = torch.cat([self.values_nk, vals], dim=1).topk(self.k, dim=1, largest=self.largest)
            idx = torch.cat([self.ids_nk, idx], dim=1).gather(1, order)
        self.values_nk, self.ids_nk = vals, idx


@dataclass
class _Softmax:
    """Online log-sum-exp and entropy of every pass, relative to the running maximum."""

    max_pn: torch.Tensor
    sum_pn: torch.Tensor  # sum exp(z - max), float64
    zsum_pn: torch.Tensor  # sum exp(z - max) * (z - max), float64

    @classmethod
    def empty(cls, n_pass: int, n: int, device) -> _Softmax:
        zeros = torch.zeros(n_pass, n, device=device, dtype=torch.float64)
        return cls(torch.full((n_pass, n), -torch.inf, device=device), zeros, zeros.clone())

    def begin_chunk(self, z_pnv: torch.Tensor, e_pnv: torch.Tensor | None = None) -> torch.Tensor:
        """Move the running max to include the chunk and write exp(z - max) into ``e_pnv`` if given.

        Returns the factor that rescales sums taken relative to the old maximum.
        """
        new_max = torch.maximum(self.max_pn, z_pnv.amax(dim=2))
        rescale = self.move_max(new_max)
        if e_pnv is not None:
            torch.sub(z_pnv, new_max[:, :, None], out=e_pnv).exp_()
        return rescale

    def move_max(self, new_max: torch.Tensor) -> torch.Tensor:
        """Make ``new_max`` (at least the current maximum) the reference; the factor that rescales old sums."""
        shift = (self.max_pn - new_max).double()
        rescale = torch.exp(shift)
        # Re-reference the old sums to the new max: sum e'(z - new) = r * (sum e(z - old) + sum e * shift).
        self.zsum_pn = torch.where(self.sum_pn > 0, rescale * (self.zsum_pn + self.sum_pn * shift), 0.0)
        self.sum_pn = self.sum_pn * rescale
        self.max_pn = new_max
        return rescale

    def add_chunk(self, chunk_sum_pn: torch.Tensor, chunk_zsum_pn: torch.Tensor) -> None:
        self.sum_pn += chunk_sum_pn
        self.zsum_pn += chunk_zsum_pn

    def lse(self) -> torch.Tensor:
        return self.max_pn.double() + torch.log(self.sum_pn)

    def entropy(self) -> torch.Tensor:
        return torch.log(self.sum_pn) - self.zsum_pn / self.sum_pn


@dataclass
class ChunkState:
    """What the torch paths carry from one vocabulary chunk to the next, for n positions."""

    pairs: list[tuple[int, int]]
    k: int
    soft: _Softmax
    tops: list[_TopK]
    rises: list[_TopK]
    falls: list[_TopK]
    kl_num: list[torch.Tensor]

    @classmethod
    def empty(cls, n_pass: int, pairs: list[tuple[int, int]], k: int, soft: _Softmax) -> ChunkState:
        n, device = soft.max_pn.shape[1], soft.max_pn.device
        return cls(pairs, k, soft, [_TopK(k) for _ in range(n_pass)], [_TopK(k) for _ in pairs],
                   [_TopK(k, largest=False) for _ in pairs],
                   [torch.zeros(n, device=device, dtype=torch.float64) for _ in pairs])

    def add_chunk(self, z_pnv: torch.Tensor, start: int) -> None:
        """Fold the logits of vocabulary entries ``start:start + width`` in, with plain torch ops."""
        k = self.k
        if k:
            for p, top in enumerate(self.tops):
                top.update(z_pnv[p], start)
        e_pnv = torch.empty_like(z_pnv)
        rescale_pn = self.soft.begin_chunk(z_pnv, e_pnv)
        tmp_nv = torch.empty_like(z_pnv[0])
        self.soft.add_chunk(
            torch.stack([_rowsum64(e) for e in e_pnv]),
            torch.stack([_rowsum64(torch.sub(z, m[:, None], out=tmp_nv).mul_(e))
                         for z, m, e in zip(z_pnv, self.soft.max_pn, e_pnv, strict=True)]),
        )
        for q, (left, right) in enumerate(self.pairs):
            shift_nv = torch.sub(z_pnv[right], z_pnv[left], out=tmp_nv)
            if k:
                self.rises[q].update(shift_nv, start)
                self.falls[q].update(shift_nv, start)
            self.kl_num[q] = self.kl_num[q] * rescale_pn[right] + _rowsum64(shift_nv.mul_(e_pnv[right]))

    def results(self):
        """(kl numerators, (top values, ids), (rises), (falls)) as :func:`lens_statistics` takes them."""
        n, device = self.soft.max_pn.shape[1], self.soft.max_pn.device

        def stack(items: list[_TopK], lead: int):
            if not items or not self.k:
                return (torch.empty(lead, n, self.k, device=device),
                        torch.empty(lead, n, self.k, dtype=torch.long, device=device))
            return torch.stack([t.values_nk for t in items]), torch.stack([t.ids_nk for t in items])

        return (self.kl_num, stack(self.tops, len(self.tops)), stack(self.rises, len(self.pairs)),
                stack(self.falls, len(self.pairs)))
