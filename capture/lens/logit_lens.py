"""The logit lens and its statistics, batched over positions and chunked over the vocabulary.

Axes legend: n = flattened position (prompt, layer, token), d = hidden, v = vocabulary
(one chunk of it), k = top-k rank, j = tracked token.

Two lenses: ``raw`` unembeds the residual directly (the legacy tool's semantics) and
``norm`` applies the model's final norm first (the standard logit lens; at the last
layer it reproduces the model's logits). Both apply what the model's head applies
after the product: the lm_head bias, ``logit_scale`` (multiply), ``logits_scaling``
(divide) and ``final_logit_softcapping`` (``cap * tanh(z / cap)``).

Products are float32 and sums float64, whatever the model dtype. Softmax statistics
use an online (streaming) log-sum-exp over vocabulary chunks, so memory is bounded
by ``rows x vocab_chunk`` and no vocabulary-sized tensor is ever materialised per
position. Entropy is accumulated relative to the running maximum, so that a peaked
distribution does not lose its entropy to cancellation. On the CPU the per-chunk
work after the products runs in the numba kernels of ``capture.lens.cpu_kernels``; on CUDA in
compiled, fused torch reductions (``capture.lens.cuda_fused``), or in plain torch where no
compiler is available; tests hold all three to the same numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from capture.errors import ModelLoadError
from capture.lens.vocab_chunks import ChunkState, _Softmax
from capture.models.transfer import to_device
from store.schema import NORM_KINDS, LensHead, norm_formula

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
        from capture.models.loading import final_norm

        head = model.get_output_embeddings()
        device = device or head.weight.device
        multiplier, softcap = _logit_extras(model)
        bias = getattr(head, "bias", None)
        norm = copy.deepcopy(final_norm(model)).to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        weight_vd = head.weight.detach().to(device)
        shared = weight_vd.untyped_storage().data_ptr() == head.weight.untyped_storage().data_ptr()
        if shared and weight_vd.device.type == "cpu":
            # Own copy: on the CPU a view would keep the model's whole memory-mapped
            # checkpoint file resident after the model is freed. On a GPU each parameter
            # has its own allocation, and a view keeps only the head alive.
            weight_vd = weight_vd.clone()
        return cls(
            weight_vd=weight_vd,
            norm=norm,
            bias_v=None if bias is None else bias.detach().to(device=device, dtype=torch.float32),
            multiplier=multiplier,
            softcap=softcap,
        )

    @property
    def vocab(self) -> int:
        return self.weight_vd.shape[0]

    def apply_norm(self, h_nd: torch.Tensor) -> torch.Tensor:
        return self.norm(h_nd.float()).float()

    def logits(
        self, h_nd: torch.Tensor, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Float32 logits of rows ``h_nd`` for vocabulary rows ``start:stop`` (into ``out`` if given)."""
        z_nv = torch.matmul(h_nd.float(), self.weight_vd[start:stop].float().T, out=out)
        return self._head_extras_(z_nv, slice(start, stop))

    def gather(self, h_nd: torch.Tensor, ids_j: torch.Tensor) -> torch.Tensor:
        """Logits of a few vocabulary rows (tracked tokens) only."""
        return self._head_extras_(h_nd.float() @ self.weight_vd[ids_j].float().T, ids_j)

    def gather_rows(self, h_nd: torch.Tensor, ids_n: torch.Tensor) -> torch.Tensor:
        """Each row's logit of its own token: ``logits(h_nd)[n, ids_n[n]]``, one product per row."""
        return self._head_extras_((h_nd.float() * self.weight_vd[ids_n].float()).sum(-1), ids_n)

    def _head_extras_(self, z_nv: torch.Tensor, rows) -> torch.Tensor:
        """Apply, in place, what the head applies after the product, for vocabulary ``rows`` (the rule of
        :meth:`store.schema.LensHead.after_product`, in place: a vocabulary chunk is the largest tensor here)."""
        if self.bias_v is not None:
            z_nv += self.bias_v[rows]
        if self.multiplier != 1.0:
            z_nv *= self.multiplier
        if self.softcap:
            z_nv.div_(self.softcap).tanh_().mul_(self.softcap)
        return z_nv


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
    target_logprob_pn: torch.Tensor


def lens_statistics(
    h_by_pass: list[torch.Tensor],
    lens_by_pass: list[Lens],
    pairs: list[tuple[int, int]],
    top_k: int,
    tracked_ids: list[int],
    vocab_chunk: int = DEFAULT_VOCAB_CHUNK,
    backend: str = "auto",
    next_ids: torch.Tensor | None = None,
) -> LensStats:
    """Entropy, log-sum-exp, top-k and tracked logits per pass; KL(right || left) and the top-k
    logit rises (right - left) and falls per pair, for rows ``h_by_pass[p]`` (n x d each).

    The inputs are the states the lens reads (already normed for the ``norm`` lens).
    ``backend``: ``kernels`` (fused numba kernels, CPU only), ``fused`` (compiled torch
    reductions, ``capture.lens.cuda_fused``), ``torch`` (one torch op at a time), or ``auto``
    (kernels on the CPU, fused on CUDA where Triton is installed, else torch). All give
    the same numbers. ``next_ids`` (n,) are the tokens that follow each row (-1: none known), whose
    log-probability under the lens is ``target_logprob``: one gathered logit per row minus the
    log-sum-exp (NaN where there is no next token, and for every row without ``next_ids``).
    """
    n, device = h_by_pass[0].shape[0], h_by_pass[0].device
    vocab = lens_by_pass[0].vocab
    if any(lens.vocab != vocab for lens in lens_by_pass):
        raise ValueError("all unembeddings must have the same vocabulary size")
    if backend == "auto":
        backend = "kernels" if device.type == "cpu" else "fused" if _fused_available(device) else "torch"
    k = min(top_k, vocab)
    soft = _Softmax.empty(len(h_by_pass), n, device)
    if backend == "fused":
        from capture.lens.cuda_fused import chunks_fused as run
    else:
        run = _chunks_with_kernels if backend == "kernels" else _chunks_with_torch
    kl_num, tops, rises, falls = run(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk)
    lse = soft.lse()
    kl = [kl_num[q] / soft.sum_pn[r] - lse[r] + lse[lft] for q, (lft, r) in enumerate(pairs)]
    ids_j = to_device(torch.as_tensor(tracked_ids, dtype=torch.long), device)  # no wait for the GPU
    return LensStats(
        entropy_pn=soft.entropy().float(),
        lse_pn=lse.float(),
        topk_id_pnk=tops[1], topk_logit_pnk=tops[0],
        tracked_pnj=torch.stack([lens.gather(h, ids_j) for lens, h in zip(lens_by_pass, h_by_pass, strict=True)]),
        # KL >= 0; float32 rounding can leave -1e-9 where the two distributions are equal.
        kl_qn=torch.stack(kl).clamp(min=0).float() if pairs else torch.empty(0, n, device=device),
        rise_id_qnk=rises[1], rise_shift_qnk=rises[0], fall_id_qnk=falls[1], fall_shift_qnk=falls[0],
        target_logprob_pn=_target_logprob(h_by_pass, lens_by_pass, lse, next_ids),
    )


def _target_logprob(h_by_pass, lens_by_pass, lse_pn: torch.Tensor, next_ids: torch.Tensor | None) -> torch.Tensor:
    """(p, n) log-probability of each row's next token under each pass's lens, NaN where it is -1 or absent."""
    n, device = h_by_pass[0].shape[0], h_by_pass[0].device
    if next_ids is None:
        return torch.full((len(h_by_pass), n), torch.nan, device=device)
    known_n = next_ids >= 0
    ids_n = next_ids.clamp(min=0)
    logit_pn = torch.stack([lens.gather_rows(h, ids_n) for lens, h in zip(lens_by_pass, h_by_pass, strict=True)])
    return torch.where(known_n, (logit_pn.double() - lse_pn).float(), torch.nan)


def _fused_available(device: torch.device) -> bool:
    from capture.lens.cuda_fused import available

    return available(device)


def _chunks_with_kernels(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk):
    """CPU path: torch for the products and the chunk maxima, numba kernels for the rest."""
    from capture.lens.cpu_kernels import FLOAT32_MAX, pair_chunk, pass_chunk

    n_pass, n, n_pair = len(h_by_pass), h_by_pass[0].shape[0], len(pairs)
    top = torch.full((n_pass, n, k), -FLOAT32_MAX), torch.full((n_pass, n, k), -1, dtype=torch.long)
    rise = torch.full((n_pair, n, k), -FLOAT32_MAX), torch.full((n_pair, n, k), -1, dtype=torch.long)
    fall = torch.full((n_pair, n, k), FLOAT32_MAX), torch.full((n_pair, n, k), -1, dtype=torch.long)
    kl_num = torch.zeros(n_pair, n, dtype=torch.float64)
    chunk_sum, chunk_zsum = torch.empty(n_pass, n, dtype=torch.float64), torch.empty(n_pass, n, dtype=torch.float64)
    left = np.array([p[0] for p in pairs], dtype=np.int64)
    right = np.array([p[1] for p in pairs], dtype=np.int64)
    # Buffers reused across chunks: fresh chunk-sized tensors cost page faults, measurably.
    z_full = torch.empty(n_pass, n, min(vocab_chunk, vocab))
    e_full = torch.empty_like(z_full)
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        fits = stop - start == z_full.shape[2]
        z_pnv = z_full if fits else torch.empty(n_pass, n, stop - start)
        e_pnv = e_full if fits else torch.empty_like(z_pnv)
        for p, (lens, h) in enumerate(zip(lens_by_pass, h_by_pass, strict=True)):
            lens.logits(h, start, stop, out=z_pnv[p])
        rescale_pn = soft.begin_chunk(z_pnv)  # the kernel writes exp(z - max) itself
        pass_chunk(z_pnv.numpy(), e_pnv.numpy(), soft.max_pn.numpy(), start, chunk_sum.numpy(), chunk_zsum.numpy(),
                   top[0].numpy(), top[1].numpy())
        soft.add_chunk(chunk_sum, chunk_zsum)
        if n_pair:
            pair_chunk(z_pnv.numpy(), e_pnv.numpy(), left, right, rescale_pn.numpy(), start, kl_num.numpy(),
                       rise[0].numpy(), rise[1].numpy(), fall[0].numpy(), fall[1].numpy())
    return list(kl_num), top, rise, fall


def _chunks_with_torch(h_by_pass, lens_by_pass, pairs, k, soft, vocab, vocab_chunk):
    """Device-agnostic path: plain torch ops."""
    n, device = h_by_pass[0].shape[0], h_by_pass[0].device
    state = ChunkState.empty(len(h_by_pass), pairs, k, soft)
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        z_pnv = torch.empty(len(h_by_pass), n, stop - start, device=device)
        for p, (lens, h) in enumerate(zip(lens_by_pass, h_by_pass, strict=True)):
            lens.logits(h, start, stop, out=z_pnv[p])
        state.add_chunk(z_pnv, start)
    return state.results()


def lens_head(model: nn.Module) -> LensHead | None:
    """The head of a loaded model's unembedding as :class:`store.schema.LensHead` (its norm found numerically),
    or None when no known norm formula reproduces the model's (the analysis then has no lens of its own)."""
    from capture.models.loading import final_norm

    try:
        norm = describe_norm(final_norm(model))
    except (ValueError, AttributeError, TypeError, ModelLoadError):
        return None
    return LensHead(norm["kind"], norm["eps"], *_logit_extras(model))


def record_lens_head(writer, source: str, head: LensHead | None) -> None:
    """Add ``source``'s head to the store's ``lens_heads`` attribute, once (None: nothing to record)."""
    heads = dict(writer.attrs.get("lens_heads") or {})
    if head is not None and source not in heads:
        writer.finalize({"lens_heads": {**heads, source: head.attrs()}})


def _logit_extras(model: nn.Module) -> tuple[float, float | None]:
    """(multiplier, softcap) the head applies after the product, from the model's config."""
    config = getattr(model.config, "text_config", None) or model.config
    multiplier = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        multiplier /= float(config.logits_scaling)
    return multiplier, getattr(config, "final_logit_softcapping", None)


def describe_norm(norm: nn.Module) -> dict:
    """Identify a final norm as one of :data:`NORM_KINDS` by checking it numerically.

    Returns ``{"kind", "eps", "weight", "bias"}`` (float32 tensors); raises ValueError
    when no known formula reproduces the module.
    """
    weight = norm.weight.detach().float().cpu()
    bias = getattr(norm, "bias", None)
    bias = torch.zeros_like(weight) if bias is None else bias.detach().float().cpu()
    eps = next((float(getattr(norm, a)) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(norm, a)), None)
    if eps is None:
        raise ValueError(f"{type(norm).__name__} has no eps attribute")
    h = torch.randn(8, weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    with torch.no_grad():
        expected = copy.deepcopy(norm).float().cpu()(h)
    for kind in NORM_KINDS:
        got = norm_formula(kind, h, weight, bias, eps, lambda x: x.mean(-1, keepdim=True))
        if torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            return {"kind": kind, "eps": eps, "weight": weight, "bias": bias}
    raise ValueError(f"the final norm {type(norm).__name__} matches none of {', '.join(NORM_KINDS)}")
