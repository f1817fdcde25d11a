"""The logit lens and its statistics, batched over positions and chunked over the vocabulary.

Axes legend: n = flattened position (prompt, layer, token), d = hidden, v = vocabulary
(one chunk of it), k = top-k rank, j = tracked token.

Two lenses: ``raw`` unembeds the residual directly (the legacy tool's semantics) and
``norm`` applies the model's final norm first (the standard logit lens; at the last
layer it reproduces the model's logits). Both apply what the model's head applies
after the product: the lm_head bias, ``logit_scale`` (multiply), ``logits_scaling``
(divide) and ``final_logit_softcapping`` (``cap * tanh(z / cap)``).

Everything is accumulated in float32 whatever the model dtype. Softmax statistics
use an online (streaming) log-sum-exp over vocabulary chunks, so memory is bounded
by ``rows x vocab_chunk`` and no vocabulary-sized tensor is ever materialised per
position. Entropy and KL are accumulated relative to the running maximum, so that a
peaked distribution does not lose its entropy to cancellation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

LENSES = ("raw", "norm")
DEFAULT_VOCAB_CHUNK = 8192


@dataclass
class Lens:
    """A model's unembedding: final norm, output weight and what the head applies after it."""

    weight_vd: torch.Tensor
    norm: nn.Module
    bias_v: torch.Tensor | None = None
    multiplier: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, model: nn.Module, device: str | torch.device | None = None) -> Lens:
        """Copy the lens parts of a loaded causal LM (small next to the model)."""
        from capture.models import final_norm

        head = model.get_output_embeddings()
        device = device or head.weight.device
        config = getattr(model.config, "text_config", None) or model.config
        multiplier = float(getattr(config, "logit_scale", None) or 1.0)
        if getattr(config, "logits_scaling", None):
            multiplier /= float(config.logits_scaling)
        bias = getattr(head, "bias", None)
        norm = copy.deepcopy(final_norm(model)).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        return cls(
            weight_vd=head.weight.detach().to(device).clone(),
            norm=norm,
            bias_v=None if bias is None else bias.detach().to(device=device, dtype=torch.float32).clone(),
            multiplier=multiplier,
            softcap=getattr(config, "final_logit_softcapping", None),
        )

    @property
    def vocab(self) -> int:
        return self.weight_vd.shape[0]

    def apply_norm(self, h_nd: torch.Tensor) -> torch.Tensor:
        return self.norm(h_nd.float()).float()

    def logits(self, h_nd: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Float32 logits of rows ``h_nd`` for vocabulary rows ``start:stop``."""
        z_nv = h_nd.float() @ self.weight_vd[start:stop].float().T
        if self.bias_v is not None:
            z_nv += self.bias_v[start:stop]
        if self.multiplier != 1.0:
            z_nv *= self.multiplier
        if self.softcap:
            z_nv = torch.tanh(z_nv / self.softcap) * self.softcap
        return z_nv

    def gather(self, h_nd: torch.Tensor, ids_j: torch.Tensor) -> torch.Tensor:
        """Logits of a few vocabulary rows (tracked tokens) only."""
        z_nj = h_nd.float() @ self.weight_vd[ids_j].float().T
        if self.bias_v is not None:
            z_nj += self.bias_v[ids_j]
        z_nj *= self.multiplier
        if self.softcap:
            z_nj = torch.tanh(z_nj / self.softcap) * self.softcap
        return z_nj


@dataclass
class _TopK:
    """Running top-k (values and vocabulary ids) merged chunk by chunk."""

    k: int
    values_nk: torch.Tensor | None = None
    ids_nk: torch.Tensor | None = None

    def update(self, chunk_nv: torch.Tensor, start: int) -> None:
        k = min(self.k, chunk_nv.shape[1])
        vals, idx = chunk_nv.topk(k, dim=1)
        idx = idx + start
        if self.values_nk is not None:
            vals = torch.cat([self.values_nk, vals], dim=1)
            idx = torch.cat([self.ids_nk, idx], dim=1)
            if vals.shape[1] > self.k:
                vals, order = vals.topk(self.k, dim=1)
                idx = idx.gather(1, order)
        self.values_nk, self.ids_nk = vals, idx


@dataclass
class _Softmax:
    """Online log-sum-exp, entropy and the KL numerators of pairs whose right side this is."""

    max_n: torch.Tensor
    sum_n: torch.Tensor  # sum exp(z - max)
    zsum_n: torch.Tensor  # sum exp(z - max) * (z - max)

    @classmethod
    def empty(cls, n: int, device) -> _Softmax:
        return cls(torch.full((n,), -torch.inf, device=device), torch.zeros(n, device=device, dtype=torch.float64),
                   torch.zeros(n, device=device, dtype=torch.float64))

    def update(self, z_nv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold in a chunk; return (exp(z - new max), rescale factor for older sums)."""
        new_max = torch.maximum(self.max_n, z_nv.max(dim=1).values)
        rescale = torch.exp(self.max_n - new_max).double()
        shift = (self.max_n - new_max).double()
        e_nv = torch.exp(z_nv - new_max[:, None])
        # Re-reference the old (z - max) sums to the new max before adding the chunk.
        old_sum = self.sum_n
        self.sum_n = old_sum * rescale + e_nv.sum(dim=1, dtype=torch.float64)
        carried = torch.where(old_sum > 0, rescale * (self.zsum_n + old_sum * shift), 0.0)
        self.zsum_n = carried + (e_nv * (z_nv - new_max[:, None])).sum(dim=1, dtype=torch.float64)
        self.max_n = new_max
        return e_nv, rescale

    def lse(self) -> torch.Tensor:
        return self.max_n.double() + torch.log(self.sum_n)

    def entropy(self) -> torch.Tensor:
        return torch.log(self.sum_n) - self.zsum_n / self.sum_n


@dataclass
class LensStats:
    """Statistics over n positions: per pass (index p) and per pair (index q)."""

    entropy_pn: torch.Tensor
    lse_pn: torch.Tensor
    topk_id_pnk: torch.Tensor
    topk_logit_pnk: torch.Tensor
    tracked_pnj: torch.Tensor
    kl_qn: torch.Tensor
    rise_id_qnk: torch.Tensor
    rise_shift_qnk: torch.Tensor
    fall_id_qnk: torch.Tensor
    fall_shift_qnk: torch.Tensor
    extra: dict = field(default_factory=dict)


def lens_statistics(
    h_by_pass: list[torch.Tensor],
    lens_by_pass: list[Lens],
    pairs: list[tuple[int, int]],
    top_k: int,
    tracked_ids: list[int],
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
) -> LensStats:
    """Entropy, log-sum-exp, top-k and tracked logits per pass; KL(right || left) and the top-k
    logit rises (right - left) and falls per pair, for rows ``h_by_pass[p]`` (n x d each).

    The inputs are the states the lens reads (already normed for the ``norm`` lens).
    """
    n, device = h_by_pass[0].shape[0], h_by_pass[0].device
    vocab = lens_by_pass[0].vocab
    if any(lens.vocab != vocab for lens in lens_by_pass):
        raise ValueError("all unembeddings must have the same vocabulary size")
    k = min(top_k, vocab)
    soft = [_Softmax.empty(n, device) for _ in h_by_pass]
    tops = [_TopK(k) for _ in h_by_pass]
    rises, falls = [_TopK(k) for _ in pairs], [_TopK(k) for _ in pairs]
    kl_num = [torch.zeros(n, device=device, dtype=torch.float64) for _ in pairs]
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        z_by_pass = [lens.logits(h, start, stop) for lens, h in zip(lens_by_pass, h_by_pass, strict=True)]
        e_by_pass, rescale_by_pass = [], []
        for p, z_nv in enumerate(z_by_pass):
            e_nv, rescale = soft[p].update(z_nv)
            e_by_pass.append(e_nv)
            rescale_by_pass.append(rescale)
            if k:
                tops[p].update(z_nv, start)
        for q, (left, right) in enumerate(pairs):
            shift_nv = z_by_pass[right] - z_by_pass[left]
            weighted_n = (e_by_pass[right] * shift_nv).sum(dim=1, dtype=torch.float64)
            kl_num[q] = kl_num[q] * rescale_by_pass[right] + weighted_n
            if k:
                rises[q].update(shift_nv, start)
                falls[q].update(-shift_nv, start)
    lse = [s.lse() for s in soft]
    kl = [kl_num[q] / soft[r].sum_n - lse[r] + lse[lft] for q, (lft, r) in enumerate(pairs)]
    ids_j = torch.as_tensor(tracked_ids, dtype=torch.long, device=device)
    empty_nk = torch.empty(n, 0, device=device)

    def stack(items, fallback):
        return torch.stack(items) if items else fallback

    return LensStats(
        entropy_pn=torch.stack([s.entropy() for s in soft]).float(),
        lse_pn=torch.stack(lse).float(),
        topk_id_pnk=torch.stack([t.ids_nk if k else empty_nk.long() for t in tops]),
        topk_logit_pnk=torch.stack([t.values_nk if k else empty_nk for t in tops]),
        tracked_pnj=torch.stack([lens.gather(h, ids_j) for lens, h in zip(lens_by_pass, h_by_pass, strict=True)]),
        kl_qn=stack([x.clamp(min=0).float() for x in kl], torch.empty(0, n, device=device)),
        rise_id_qnk=stack([r.ids_nk if k else empty_nk.long() for r in rises], torch.empty(0, n, k).long()),
        rise_shift_qnk=stack([r.values_nk if k else empty_nk for r in rises], torch.empty(0, n, k)),
        fall_id_qnk=stack([f.ids_nk if k else empty_nk.long() for f in falls], torch.empty(0, n, k).long()),
        fall_shift_qnk=stack([-f.values_nk if k else empty_nk for f in falls], torch.empty(0, n, k)),
    )
