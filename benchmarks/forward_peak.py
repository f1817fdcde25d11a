"""The memory one compute batch takes on the CPU, against the plan's ``forward_activations``.

In a fresh process: a random Llama-shaped model (4 layers, hidden 512, MLP 1536, 8 heads), one small
forward to load what the first call loads, then one batch of ``--batch`` prompts of ``--tokens`` tokens
(one row padded): the residual capture's forward, its non-finite check and the padding made NaN, as the
runner does them. The process's peak RSS grows by what the batch held at its peak, and the CPU allocator's
traced peak (``capture.plan.memory_trace``) is what it allocated at most at once; both are compared with
:func:`capture.plan.budget.forward_activations`. Prints one JSON line. The RSS measure is noisy (the same batch
of 128 prompts measured 541 to 671 MB in five runs on the 2-core machine); the traced one is exact and is
tested (``tests/capture/test_memory_plan.py``).

    python benchmarks/forward_peak.py --batch 64
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from capture.pipeline.runner import _first_non_finite, forward_residuals
from capture.plan.budget import ModelFootprint, forward_activations
from capture.plan.memory_trace import traced_peak

SHAPE = dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1536, vocab_size=32000, max_position_embeddings=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE)).eval()
    small = torch.randint(0, SHAPE["vocab_size"], (1, 4))
    forward_residuals(model, model.get_input_embeddings(), small, torch.ones_like(small))
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    mask[0, args.tokens - 10:] = 0

    def one_batch():
        with torch.inference_mode():
            resid, final = forward_residuals(model, model.get_input_embeddings(), ids, mask)
            _first_non_finite(resid, mask.bool())
            resid.masked_fill_(~mask.bool()[:, None, :, None], float("nan"))
            final.masked_fill_(~mask.bool()[:, :, None], float("nan"))

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    one_batch()
    measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    traced = traced_peak(one_batch)  # after the RSS measure: the profiler's own memory stays out of it
    footprint = ModelFootprint(params=0, embedding=0, head=0, mapped=True, n_layers=SHAPE["num_hidden_layers"],
                               hidden=SHAPE["hidden_size"], vocab=SHAPE["vocab_size"],
                               ffn=SHAPE["intermediate_size"], n_heads=SHAPE["num_attention_heads"])
    predicted = forward_activations(footprint, args.batch, args.tokens, 4, 4, on_cpu=True)
    print(json.dumps({"batch": args.batch, "tokens": args.tokens, "rss_growth": measured, "traced": traced,
                      "predicted": predicted, "error_vs_rss": round(predicted / measured - 1, 3),
                      "error_vs_traced": round(predicted / traced - 1, 3)}))


if __name__ == "__main__":
    main()
