"""Generation before capture (issue 27): resdiff's ``capture --generate`` against transformers' ``generate``.

The smollm2 pair, real chat prompts (questions about standard-library functions, rendered with the chat
template's generation prompt), 64 new tokens, greedy. Both sides use the same loaded model, the same batches
(``generation_batches``), the same left padding and generation config: the ratio is resdiff's overhead
(padding, stop handling, the journal written per batch) over the decoding itself. Rounds alternate the two
sides; each side's time is its best round. The responses of both must be identical.

    python benchmarks/generation.py --prompts 100 --new-tokens 64 --out gen.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from benchmarks.common import emit_report, machine
from benchmarks.researcher import QUESTIONS, corpus


def chat_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` one-turn conversations asking about standard-library functions."""
    rng = random.Random(seed)
    items = corpus()
    rng.shuffle(items)
    with path.open("w") as fh:
        for name, _ in items[:n]:
            fh.write(json.dumps({"messages": [{"role": "user", "content": rng.choice(QUESTIONS).format(name=name)}]})
                     + "\n")
    return path


def direct(model, prep, batches: list[list[int]], stops: list[int], pad_id: int) -> dict[int, list[int]]:
    """transformers' ``generate`` called on the same batches, padding and config; the raw new tokens."""
    from transformers import GenerationConfig

    tokenized, new = prep.source, prep.generation.new_tokens
    config = GenerationConfig(max_new_tokens=new, do_sample=False, num_beams=1, eos_token_id=stops,
                              pad_token_id=pad_id, temperature=None, top_k=None, top_p=None)
    out = {}
    for batch in batches:
        prompts = [tokenized.ids[r] for r in batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            written = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        for row, r in enumerate(batch):
            out[r] = written[row, width:].tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()

    import capture.models.loading as loading
    from capture.inputs.responses import Journal
    from capture.pipeline.generate import generate_responses, generation_batches, stop_ids
    from capture.plan.prepare import pad_id_of, prepare
    from capture.settings import CaptureSettings

    work = Path(tempfile.mkdtemp(prefix="resdiff-gen-"))
    settings = CaptureSettings(model_pair="smollm2", prompts_files=[str(chat_prompts(work / "chats.jsonl",
                                                                                     args.prompts))],
                               generate=args.new_tokens, device="cpu", store=str(work / "run.zarr"))
    prep = prepare(settings, log=lambda *a: None)
    model = loading.load_model(prep.refs["sft"], prep.resolved.dtype, "cpu", None, False, **settings.load_kwargs())
    loading.load_model = lambda *a, **k: model  # both sides share the loaded model: no load is timed
    loading.release_memory = lambda *a, **k: None
    stops, pad_id = stop_ids(model, prep.tokenizer), pad_id_of(prep.tokenizer)
    lengths = prep.source.lengths
    batches = generation_batches(lengths, settings.batch_size_for("cpu"), settings.batch_tokens, args.new_tokens,
                                 prep.shapes["sft"].max_positions)
    report = {"machine": machine(), "pair": "smollm2", "model": "sft", "dtype": prep.resolved.dtype,
              "prompts": len(lengths), "prompt_tokens": sum(lengths), "new_tokens": args.new_tokens,
              "batches": len(batches), "batch_size": settings.batch_size_for("cpu"), "rounds": []}
    times: dict[str, list[float]] = {"resdiff": [], "direct": []}
    for index in range(args.rounds):
        start = time.perf_counter()
        raw = direct(model, prep, batches, stops, pad_id)
        times["direct"].append(time.perf_counter() - start)
        journal = Journal(work / f"round{index}.zarr", prep.fingerprint)
        start = time.perf_counter()
        found = generate_responses(prep, journal, log=lambda *a: None, progress=False)
        times["resdiff"].append(time.perf_counter() - start)
        journal.discard()
        for r, ids in raw.items():  # identical responses: resdiff's are the direct ones cut after the stop
            end = next((i for i, t in enumerate(ids) if t in stops), None)
            want = ids if end is None else ids[: end + 1]
            assert found[prep.source.label(r)].ids == want[: args.new_tokens], r
        report["rounds"].append({k: round(v[-1], 2) for k, v in times.items()})
        report["response_tokens"] = sum(len(f.ids) for f in found.values())
        report["stops"] = {s: sum(f.stop == s for f in found.values()) for s in ("eos", "length", "context")}
        report.update({f"{k}_s": round(min(v), 2) for k, v in times.items()})
        report["ratio"] = round(min(times["resdiff"]) / min(times["direct"]), 3)
        emit_report(report, args.out)


if __name__ == "__main__":
    main()
