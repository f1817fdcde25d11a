"""Running passes over prompt batches and handing back chunk-aligned groups.

Axes legend: g = prompt in a write group, b = prompt in a compute batch, l = layer
(0..L), t = token position, d = hidden dimension.

Write groups are sized to the store's prompt chunks so each group is one set of
whole chunks; compute batches (``--batch-size``) run inside a group. Batches are
right-padded, which is exact for every supported architecture; position ids come
from the attention mask so GPT-2's learned positions stay correct too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from capture.hooks import ResidualRecorder
from capture.models import decoder, decoder_layers
from capture.passes import Pass
from capture.prompts import TokenizedPrompts
from store.errors import NonFiniteActivation


@dataclass
class CapturedGroup:
    """Residuals of one pass over one write group of prompts, padded positions NaN."""

    pass_index: int
    prompts: slice
    resid_gltd: np.ndarray
    final_gtd: np.ndarray
    n_real_tokens: int


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def forward_residuals(
    model: nn.Module,
    embedding: nn.Module,
    ids_bt: torch.Tensor,
    mask_bt: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` on ``embedding(ids_bt)``; returns (resid_bltd, final_btd).

    Only the decoder body runs: the LM head (a vocabulary-sized product) is not needed
    for residuals.
    """
    layers = decoder_layers(model)
    device = _device_of(model.get_input_embeddings())
    ids_bt, mask_bt = ids_bt.to(device), mask_bt.to(device)
    model_dtype = model.get_input_embeddings().weight.dtype
    embeds_btd = embedding(ids_bt.to(_device_of(embedding))).to(device=device, dtype=model_dtype)
    position_ids_bt = (mask_bt.long().cumsum(-1) - 1).clamp(min=0)
    n_batch, n_tok = ids_bt.shape
    resid_bltd = torch.empty(n_batch, len(layers) + 1, n_tok, embeds_btd.shape[-1], dtype=out_dtype, device=device)
    with ResidualRecorder(layers, resid_bltd):
        out = decoder(model)(
            inputs_embeds=embeds_btd, attention_mask=mask_bt, position_ids=position_ids_bt, use_cache=False
        )
    return resid_bltd, out.last_hidden_state.to(out_dtype)


def _check_finite(resid_bltd: torch.Tensor, row: int, n_tok: int, pass_name: str, prompt: int) -> None:
    real_ltd = resid_bltd[row, :, :n_tok]
    if bool(torch.isfinite(real_ltd).all()):
        return
    layer, token, dim = (int(i) for i in (~torch.isfinite(real_ltd)).nonzero()[0])
    raise NonFiniteActivation(pass_=pass_name, prompt=prompt, layer=layer, token=token,
                              value=float(real_ltd[layer, token, dim]))


def _pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_tok = max(len(i) for i in ids)
    ids_bt = torch.full((len(ids), n_tok), pad_id, dtype=torch.long)
    mask_bt = torch.zeros((len(ids), n_tok), dtype=torch.long)
    for row, seq in enumerate(ids):
        ids_bt[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask_bt[row, : len(seq)] = 1
    return ids_bt, mask_bt


def run_passes(
    model: nn.Module,
    passes: list[tuple[int, Pass]],
    embeddings: dict[str, nn.Module],
    prompts: TokenizedPrompts,
    groups: list[slice],
    *,
    batch_size: int,
    n_tokens_store: int,
    out_dtype: torch.dtype,
    pad_id: int = 0,
    skip: Callable[[int, slice], bool] = lambda pass_index, group: False,
) -> Iterator[CapturedGroup]:
    """Yield one :class:`CapturedGroup` per (pass, write group) not skipped."""
    n_layers1 = len(decoder_layers(model)) + 1
    np_dtype = torch.empty(0, dtype=out_dtype).numpy().dtype
    for pass_index, spec in passes:
        for group in groups:
            if skip(pass_index, group):
                continue
            size = group.stop - group.start
            hidden = embeddings[spec.embedding].weight.shape[-1]
            resid_gltd = np.full((size, n_layers1, n_tokens_store, hidden), np.nan, dtype=np_dtype)
            final_gtd = np.full((size, n_tokens_store, hidden), np.nan, dtype=np_dtype)
            n_real = 0
            for start in range(group.start, group.stop, batch_size):
                rows = range(start, min(start + batch_size, group.stop))
                ids_bt, mask_bt = _pad_batch([prompts.ids[i] for i in rows], pad_id)
                resid_bltd, final_btd = forward_residuals(model, embeddings[spec.embedding], ids_bt, mask_bt, out_dtype)
                resid_bltd, final_btd = resid_bltd.cpu(), final_btd.cpu()
                for row, prompt in enumerate(rows):
                    n_tok = len(prompts.ids[prompt])
                    _check_finite(resid_bltd, row, n_tok, spec.name, prompt)
                    resid_gltd[prompt - group.start, :, :n_tok] = resid_bltd[row, :, :n_tok].numpy()
                    final_gtd[prompt - group.start, :n_tok] = final_btd[row, :n_tok].numpy()
                    n_real += n_tok
            yield CapturedGroup(pass_index, group, resid_gltd, final_gtd, n_real)


class Throughput:
    """Tokens per second over a run, for the progress bar."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> float:
        self.tokens += n
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
