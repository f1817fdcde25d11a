"""Where the statistics stage's time goes on one block: lens products alone vs all statistics.

Random lens weights of a real shape (default Qwen2.5-1.5B: vocabulary 151,936 x 1,536),
four passes of ``rows`` states, six pairs, top-20, on ``--device``, for each statistics
backend there (CUDA: fused and torch; CPU: kernels, fused and torch), with a profiler
table of the slowest operators of the default backend on CUDA.

    python benchmarks/profile_lens.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine, timed
from capture.lens.logit_lens import Lens, lens_statistics
from capture.lens.stage import statistics_blocks

MODEL_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--dtype", default="bfloat16", help="lens weight dtype")
    parser.add_argument("--rows", type=int, help="rows per block (default: the statistics stage's)")
    parser.add_argument("--vocab-chunk", type=int, help="vocabulary chunk (default: the statistics stage's)")
    parser.add_argument("--profile", action="store_true", help="print the profiler's operator table")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows, chunk = statistics_blocks(device)
    rows, chunk = args.rows or rows, args.vocab_chunk or chunk
    backends = ["fused", "torch"] if device.type == "cuda" else ["kernels", "fused", "torch"]
    torch.manual_seed(0)
    lenses = [Lens(weight_vd=torch.randn(args.vocab, args.hidden, device=device).to(getattr(torch, args.dtype)),
                   norm=torch.nn.Identity()) for _ in range(2)]
    by_pass = [lenses[0], lenses[1], lenses[0], lenses[1]]
    h = [torch.randn(rows, args.hidden, device=device) for _ in range(4)]

    def products() -> None:
        for lens, h_nd in zip(by_pass, h, strict=True):
            for start in range(0, args.vocab, chunk):
                lens.logits(h_nd, start, start + chunk)

    def statistics(backend: str = "auto") -> None:
        lens_statistics(h, by_pass, MODEL_PAIRS, 20, [], chunk, backend=backend)

    times: dict[str, float] = {}
    runs = [("products", products)] + [(f"statistics {b}", lambda b=b: statistics(b)) for b in backends]
    for _, run in runs:  # warm-up (and the fused path's compilation)
        run()
    for name, run in runs:
        best = []
        for _ in range(3):
            with timed(times, name):
                run()
            best.append(times[name])
        times[name] = min(best)
    print(json.dumps({"machine": machine(), "rows": rows, "vocab_chunk": chunk,
                      "seconds": {k: round(v, 4) for k, v in times.items()},
                      "statistics_over_products": {b: round(times[f"statistics {b}"] / times["products"], 2)
                                                   for b in backends}}))
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            statistics()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
