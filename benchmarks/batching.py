"""Default batching against the best fixed batch size: does ``capture`` pay for padding?

On the ``smollm2`` pair (real weights), for a prompt set, measured in one run:

  forward@N  the four bare forwards (decoder bodies, no hooks, models loaded once each) over the prompts
             sorted by length and cut into batches of N, for N = 8, 16, 32, 64
  resid      ``capture --no-lens`` with default options (its own batching), models loaded, store written
and reports resid / min over N of forward@N: target <= 1.15. Sets: ``ragged`` (standard-library docstrings,
median ~40 tokens, longest ~15x the median; see benchmarks/ragged.py) and ``uniform`` (64 prompts of ~100
tokens, benchmarks/common.py).

    python benchmarks/batching.py --set ragged --prompts 100
    python benchmarks/batching.py --set uniform
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit_report, machine, prompt_set, timed  # noqa: E402
from benchmarks.ragged import bare_forwards, ragged_set  # noqa: E402
from capture.pipeline.job import run_capture  # noqa: E402
from capture.settings import CaptureSettings  # noqa: E402

SIZES = (8, 16, 32, 64)
NO_TOKEN_BUDGET = 1 << 40  # fixed batches of N: no padded-token budget cuts them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=["ragged", "uniform"], default="ragged")
    parser.add_argument("--prompts", type=int, default=100, help="prompts of the ragged set")
    parser.add_argument("--models-dir", default=None, help="where the smollm2 pair is built (kept between runs)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from capture.models.smollm import ensure_smollm_pair

    work = Path(tempfile.mkdtemp(prefix="resdiff-batching-"))
    base, sft = ensure_smollm_pair(args.models_dir)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = ragged_set(tokenizer, args.prompts) if args.set == "ragged" else prompt_set("64x100")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    lengths = np.array([len(i) for i in ids])
    settings = CaptureSettings(base=base, sft=sft, prompts=prompts, lens=False, device="cpu")
    run_capture(CaptureSettings(**{**settings.__dict__, "prompts": prompts[:4], "store": str(work / "w.zarr")}),
                progress=False)  # warm-up: imports, first loads from disk
    seconds = {f"forward@{n}": bare_forwards(base, sft, ids, n, NO_TOKEN_BUDGET) for n in SIZES}
    with timed(seconds, "resid"):
        run_capture(CaptureSettings(**{**settings.__dict__, "store": str(work / "r.zarr")}), progress=False)
    best = min(SIZES, key=lambda n: seconds[f"forward@{n}"])
    report = {
        "machine": machine(), "pair": "smollm2", "set": args.set, "prompts": len(prompts),
        "tokens": int(lengths.sum()), "longest_tokens": int(lengths.max()), "median_tokens": float(np.median(lengths)),
        "seconds": {k: round(v, 2) for k, v in seconds.items()}, "best_fixed_batch": best,
        "resid_over_best_forward": round(seconds["resid"] / seconds[f"forward@{best}"], 3),
        "default_batch_padding": CaptureSettings().padding_for("cpu"),
    }
    emit_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
