"""How much memory a capture needs, predicted from model configs alone (no weights read).

Sizes are bytes. The model is built on PyTorch's ``meta`` device to count its
parameters exactly for any architecture; checkpoint headers (a few KB of JSON at the
start of each ``.safetensors`` file) say whether the weights will stay memory-mapped.

What is resident in each step of a capture (see ``capture.pipeline.job``):

- the active model. On the CPU, when the checkpoint's dtype is the run's dtype,
  transformers leaves the weights memory-mapped and only the pages the forward
  touches count: the decoder blocks, not the vocabulary-sized embedding and head
  (the capture runs the decoder body only and looks up a few embedding rows).
  Otherwise (a dtype conversion, or CUDA) every parameter is materialised;
- the other model's input embedding when a pass of this model reads it (memory-mapped
  on the CPU in the same case as above, else materialised);
- lens weights (one vocabulary x hidden matrix per unembedding) collected so far, and
  copies of input embeddings kept for later passes;
- one compute batch of activations and, on the CPU, one write group's buffers.

The statistics stage holds both lenses, one prompt group of residuals as float32 and
the per-block logits. Process overhead (interpreter, libraries, compiled kernels) is
measured, not modelled: :func:`process_baseline` reads it from the running process.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from capture.lens.vocab_chunks import TOPK_SEGMENT
from capture.models.loading import DTYPES, _text_config
from store import units
from store.schema import statistics_bytes_per_position


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes of one model at the run's dtype, and how its weights will be held."""

    params: int  # all parameters, tied weights once
    embedding: int  # the input embedding weight
    head: int  # the output head weight (0 when tied to the embedding)
    mapped: bool  # weights stay memory-mapped on the CPU: untouched pages do not count
    n_layers: int
    hidden: int
    vocab: int
    ffn: int
    n_heads: int
    fused_attention: bool = True  # SDPA or flash attention: no (heads, tokens, tokens) score tensor is made

    @property
    def body(self) -> int:
        """The parameters a decoder-only forward reads in full."""
        return self.params - self.embedding - self.head


def checkpoint_dtype(ref: str) -> str | None:
    """The dtype of a local safetensors checkpoint's largest tensor, read from its header."""
    folder = Path(ref)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    best: tuple[int, str | None] = (-1, None)
    for file in files[:1]:  # shards share one dtype
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                size = int(info["data_offsets"][1]) - int(info["data_offsets"][0])
                best = max(best, (size, units.DTYPE_ALIASES.get(info["dtype"])), key=lambda x: x[0])
    return best[1]


def model_footprint(ref: str, dtype: str, device: str, trust_remote_code: bool = False) -> ModelFootprint:
    """Count a model's parameters from its config by building it on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    itemsize = units.itemsize(dtype)
    params = {id(p): p.numel() for p in model.parameters()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    text = _text_config(config)
    hidden = int(text.hidden_size)
    return ModelFootprint(
        params=sum(params.values()) * itemsize,
        embedding=embedding.numel() * itemsize,
        head=0 if head is embedding else head.numel() * itemsize,
        mapped=str(device) == "cpu" and checkpoint_dtype(ref) == dtype,
        n_layers=int(text.num_hidden_layers), hidden=hidden, vocab=int(text.vocab_size),
        ffn=int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden),
        n_heads=int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1)),
        # transformers picks the attention when it builds the model (SDPA where the architecture has it)
        fused_attention=getattr(model.config, "_attn_implementation", "eager") != "eager",
    )


def resident_weights(model: ModelFootprint) -> int:
    """Weight bytes that count while the model runs its passes."""
    return model.body if model.mapped else model.params


def resident_embedding(model: ModelFootprint) -> int:
    """Bytes of this model's input embedding read on its own (for another model's passes)."""
    return 0 if model.mapped else model.embedding


def forward_activations(model: ModelFootprint, batch: int, n_tokens: int, out_itemsize: int, model_itemsize: int,
                        on_cpu: bool, kept_layers: int | None = None) -> int:
    """One compute batch: the captured residuals, and the largest transient of one block.

    The transient is the block's MLP (gate, up and activation: three ``ffn``-wide
    tensors), the batch's 4-D attention mask (``tokens x tokens``: boolean under SDPA, additive in the
    model's dtype under eager attention; ``capture.models.masks``) and, under eager attention only, the
    scores (``heads x tokens x tokens``, float32; SDPA's kernels work in blocks). ``kept_layers`` is the
    number of layers recorded (default all L + 1); ``final`` comes on top. The non-finite
    check's temporaries are (batch, layer, token): a ``hidden``-th of the residuals, left out.
    Within 20% of the traced peak on the CPU (``tests/capture/test_memory_plan.py``).
    """
    captured = batch * ((kept_layers or model.n_layers + 1) + 1) * n_tokens * model.hidden * out_itemsize
    block = batch * n_tokens * (3 * model.ffn + 4 * model.hidden) * model_itemsize
    square = batch * n_tokens * n_tokens
    scores = square if model.fused_attention else square * (model.n_heads * 4 + model_itemsize)
    # On CUDA the last batch's residuals stay alive until their copy to the host is done (capture.models.transfer).
    host_copy = captured if not on_cpu else 0
    return captured + block + scores + host_copy


def group_buffers(model: ModelFootprint, group: int, n_tokens: int, out_itemsize: int,
                  kept_layers: int | None = None) -> int:
    """Host buffers: the group being computed, the one being written and the writer's encoded copy."""
    one = group * ((kept_layers or model.n_layers + 1) + 1) * n_tokens * model.hidden * out_itemsize
    return 3 * one


LENS_READ_BYTES = 64 * 2**20  # float32 residuals the statistics stage reads at once, of all passes


def lens_read_prompts(group: int, n_pass: int, n_layers1: int, n_tokens: int, hidden: int) -> int:
    """Prompts of a write group whose residuals the statistics stage reads (as float32) at once."""
    return max(1, min(group, LENS_READ_BYTES // max(1, n_pass * n_layers1 * n_tokens * hidden * 4)))


def statistics_working_set(model: ModelFootprint, n_pass: int, n_pair: int, group: int, n_tokens: int,
                           store_itemsize: int, top_k: int, n_tracked: int, block_rows: int,
                           vocab_chunk: int, kept_layers: int | None = None) -> dict[str, int]:
    """The statistics stage's memory besides the lenses, for one prompt group of ``n_tokens`` positions."""
    positions = group * (kept_layers or model.n_layers + 1) * n_tokens
    read = min(group, lens_read_prompts(group, n_pass, kept_layers or model.n_layers + 1, n_tokens, model.hidden))
    residuals = n_pass * read * (kept_layers or model.n_layers + 1) * n_tokens * model.hidden * (store_itemsize + 4 + 4)
    per_position = statistics_bytes_per_position(n_pass, n_pair, top_k, n_tracked)
    # the fused path's chunks hold at least top_k segments (capture.lens.cuda_fused.chunk_bounds)
    chunk = min(max(vocab_chunk, top_k * TOPK_SEGMENT), model.vocab)
    logits = 3 * n_pass * min(block_rows, positions) * chunk * 4  # products, exp, scratch
    return {"residuals": residuals, "statistics": positions * per_position, "logits": logits}


# Memory a CPU capture holds beyond what is modelled above: the malloc arenas of the
# writer and chunk threads (glibc keeps freed encode buffers in each thread's arena), Zarr's
# encode buffers and PyTorch's allocator caches. Measured at 45-81 MiB on the reference machine
# (2-core x86-64, glibc) for pairs of 10 MB to 500 MB, the most on 20,000 prompts of up to 244
# tokens and on 20,000 short prompts with the lens statistics; a fifth more for headroom.
CPU_RUNTIME_SLACK = 96 * 2**20


def process_baseline(device: str) -> int:
    """Bytes already in use that a capture's peak includes: process RSS, or CUDA allocations."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.memory_allocated(torch.device(device)))
    import psutil

    return int(psutil.Process(os.getpid()).memory_info().rss)
