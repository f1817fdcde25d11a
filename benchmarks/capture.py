"""Capture benchmark: capture time against the unavoidable work, measured in one run.

Measures, on a random-init pair of a given shape built locally:
  forward   the four bare forward passes (decoder bodies, no hooks), loading each model once;
  lens      the lens matrix products alone (4 passes x 2 lenses, float32, vocabulary chunks);
  resid     `capture --no-lens` end to end (models loaded, residuals written to a store);
  full      `capture` with statistics end to end.
and prints the ratios resid / forward (target <= 1.15) and full / (forward + lens) (target <= 1.5).

    python benchmarks/capture.py                       # GPT-2-small shape, dev prompts, CPU
    python benchmarks/capture.py --shape qwen0.5b --prompts 64x100 --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import build_pair, machine, prompt_set, timed
from capture.lens import Lens
from capture.models import decoder, load_model, release_memory
from capture.plan import DEFAULT_PASSES
from capture.prompts import tokenize_prompts
from capture.runner import _pad_batch
from capture.settings import CaptureSettings
from store.job import run_capture


@torch.inference_mode()
def bare_forward_and_lens(base: Path, sft: Path, prompts: list[str], batch: int, device: str, dtype: str):
    """Time the minimal work: load each model once, four plain forwards, then the lens products."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tokenize_prompts(tok, prompts).ids
    times: dict[str, float] = {"forward": 0.0, "lens": 0.0}
    embeds, lenses, states = {}, {}, []
    for llm, ref in (("base", base), ("sft", sft)):
        with timed(times, "t"):
            model = load_model(str(ref), dtype, device)
            embeds[llm] = model.get_input_embeddings()
        times["forward"] += times.pop("t")
        lenses[llm] = Lens.from_model(model)
        for spec in (p for p in DEFAULT_PASSES if p.llm == llm):
            for start in range(0, len(ids), batch):
                ids_bt, mask_bt = _pad_batch(ids[start:start + batch], 0)
                with timed(times, "t"):
                    emb = embeds.get(spec.embedding, embeds[llm])
                    out = decoder(model)(inputs_embeds=emb(ids_bt.to(device)), attention_mask=mask_bt.to(device),
                                         output_hidden_states=True, use_cache=False)
                times["forward"] += times.pop("t")
                states.append((spec, torch.cat([h[mask_bt.bool()] for h in out.hidden_states]).float()))
        del model
        release_memory()
    with timed(times, "lens"):
        for spec, h_nd in states:
            lens = lenses[spec.unembedding]
            for lens_input in (h_nd, lens.apply_norm(h_nd)):
                for start in range(0, h_nd.shape[0], 512):
                    for v in range(0, lens.vocab, 8192):
                        lens.logits(lens_input[start:start + 512], v, v + 8192)
    return times, sum(len(i) for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2-small", choices=["gpt2-small", "qwen0.5b"])
    parser.add_argument("--prompts", default="dev", choices=["dev", "64x100"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--models-dir", default=None, help="reuse built models here (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="resdiff-bench-"))
    models_dir = Path(args.models_dir) if args.models_dir else work
    base, sft = build_pair(args.shape, models_dir)
    prompts = prompt_set(args.prompts)
    common = dict(base=str(base), sft=str(sft), prompts=prompts, device=args.device, dtype=args.dtype,
                  batch_size=args.batch_size)
    # Warm-up, not timed: lazy imports, first loads from disk, kernel compilation (cached on disk).
    bare_forward_and_lens(base, sft, prompts[:1], args.batch_size, args.device, args.dtype)
    run_capture(CaptureSettings(**{**common, "prompts": prompts[:1]}, store=str(work / "warm.zarr")), progress=False)
    runs: dict[str, list[float]] = {"forward": [], "lens": [], "resid": [], "full": []}
    for attempt in range(args.repeat):
        baseline, n_tokens = bare_forward_and_lens(base, sft, prompts, args.batch_size, args.device, args.dtype)
        for key, value in baseline.items():
            runs[key].append(value)
        for key, lens in (("resid", False), ("full", True)):
            settings = CaptureSettings(**common, lens=lens, store=str(work / f"{key}{attempt}.zarr"))
            with timed(baseline, key):
                run_capture(settings, progress=False)
            runs[key].append(baseline[key])
    results = {key: min(values) for key, values in runs.items()}
    report = {
        "machine": machine(), "shape": args.shape, "prompts": args.prompts, "tokens": n_tokens,
        "device": args.device, "dtype": args.dtype, "repeat": args.repeat,
        "seconds": {k: round(v, 2) for k, v in results.items()},
        "all_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "resid_over_forward": round(results["resid"] / results["forward"], 3),
        "full_over_forward_plus_lens": round(results["full"] / (results["forward"] + results["lens"]), 3),
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
