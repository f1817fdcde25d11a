"""The capture pipeline on its own: a pair whose forwards cost almost nothing, many real prompts.

The tiny pair (4 blocks x 64) on ``--prompts`` texts cut from the standard library's
docstrings (whole docstrings, their paragraphs and their first lines: a few words to a few
hundred tokens, repeated with a counter up to the count asked). Measured in one run:

  forward   the four bare decoder forwards in length-sorted batches of 64, each model loaded once
  write     a plain sequential write (64 MiB blocks, fsync at the end) of the real-token bytes that
            capture stores (4 passes x (layers + final) x dim x 2 bytes per token) to the same disk
  resid     ``capture --no-lens --batch-size 64`` (in process, loads included): the floor's batches, so that
            the ratio is the pipeline's own cost (the CPU default of 8, chosen on real weights in issue 23,
            makes the tiny pair's forwards, which cost less than their per-batch overhead, ~1.4x slower)

Target ``resid / (forward + write) <= 1.5``. With ``--profile`` the capture also runs under
cProfile and the top functions by cumulative time are printed.

    python benchmarks/pipeline.py --prompts 20000 --repeat 2
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

from benchmarks.common import emit_report, machine, plain_write, real_token_bytes, timed  # noqa: E402
from benchmarks.ragged import bare_forwards, docstrings  # noqa: E402
from capture.pipeline.job import run_capture  # noqa: E402
from capture.settings import CaptureSettings  # noqa: E402

BATCH = 64  # prompts per batch of the floor's forwards and of the capture


def real_texts(tokenizer, n: int, max_tokens: int) -> list[str]:
    """``n`` texts of real prose from docstrings, each within ``max_tokens`` tokens."""
    pieces = []
    for doc in docstrings():
        pieces += [doc, *doc.split("\n\n"), doc.splitlines()[0]]
    pieces = sorted({p.strip() for p in pieces} - {""})
    fits = [p for p in pieces if len(tokenizer(p, add_special_tokens=False)["input_ids"]) < max_tokens - 8]
    return [fits[i % len(fits)] + (f" ({i // len(fits)})" if i >= len(fits) else "") for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models-dir", default=None, help="where the tiny pair is built (kept between runs)")
    parser.add_argument("--work-dir", default=None, help="where the stores are written (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="also profile one capture with cProfile")
    parser.add_argument("--codec", default=None, help="capture --codec (default: capture's default)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from capture.models.tiny import ensure_tiny_pair
    from store.reader import open_store

    work = Path(tempfile.mkdtemp(prefix="resdiff-pipeline-", dir=args.work_dir))
    base, sft = ensure_tiny_pair(args.models_dir or work / "models", log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = real_texts(tokenizer, args.prompts, 256)
    codec = {"codec": args.codec} if args.codec else {}
    settings = CaptureSettings(base=base, sft=sft, prompts=prompts, lens=False, device="cpu", batch_size=BATCH,
                               **codec)
    ids = [tokenizer(t)["input_ids"] for t in prompts]  # as capture tokenises (special tokens as configured)
    run_capture(CaptureSettings(**{**settings.__dict__, "prompts": prompts[:64], "store": str(work / "w.zarr")}),
                progress=False)  # warm-up: imports, kernels, first reads
    runs: dict[str, list[float]] = {"forward": [], "write": [], "resid": []}
    for attempt in range(args.repeat):
        runs["forward"].append(bare_forwards(base, sft, ids, BATCH, 1 << 62))
        store = work / f"r{attempt}.zarr"
        with timed(times := {}, "resid"):
            run_capture(CaptureSettings(**{**settings.__dict__, "store": str(store)}), progress=False)
        runs["resid"].append(times["resid"])
        ds = open_store(store)
        real = int(ds.n_tokens.sum())
        runs["write"].append(plain_write(work, real_token_bytes(ds)))
        if attempt < args.repeat - 1:
            shutil.rmtree(store)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(run_capture, CaptureSettings(**{**settings.__dict__, "store": str(work / "p.zarr")}),
                         progress=False)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(40)
    best = {k: min(v) for k, v in runs.items()}
    lengths = ds.n_tokens.values
    files = [f for f in store.rglob("*") if f.is_file()]
    on_disk = sum(f.stat().st_size for f in files)
    data_files = [f for f in files if f.name != "zarr.json"]
    report = {
        "machine": machine(), "pair": "tiny", "codec": settings.codec, "prompts": len(prompts), "tokens": real,
        "median_tokens": float(np.median(lengths)), "longest_tokens": int(lengths.max()),
        "real_bytes": real_token_bytes(ds), "on_disk_bytes": on_disk,
        "files": len(files), "data_files": len(data_files),
        "mib_per_data_file": round(sum(f.stat().st_size for f in data_files) / 2**20 / max(1, len(data_files)), 2),
        "chunks": list(ds.resid.data.chunksize),
        "seconds": {k: round(v, 2) for k, v in best.items()},
        "all_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "resid_over_floor": round(best["resid"] / (best["forward"] + best["write"]), 3),
    }
    emit_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
