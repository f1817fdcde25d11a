"""Store write throughput: resdiff's capture writer against a raw Zarr write of the same bytes.

Both write the same float16 residual groups (random values, NaN padding as a capture
leaves it) into arrays of the same shape, chunks and codec (Zstd level 3):
  ours  ``StoreWriter.create`` (template, coordinates, attributes) + ``write_region`` for
        every (pass, prompt group), which also flags each region done;
  raw   ``zarr.create_array`` for ``resid`` and ``final`` + plain slice assignment.
Throughput counts the uncompressed residual bytes. Target (issue 8): ours / raw >= 0.8.

    python benchmarks/store_write.py                  # GPT-2-small shape, 64 prompts x 128 tokens
    python benchmarks/store_write.py --shape qwen1.5b --repeat 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"gpt2-small": (13, 768), "qwen0.5b": (25, 896), "qwen1.5b": (29, 1536)}


def groups_of(n_prompts: int, chunk: int, n_layers1: int, n_tokens: int, hidden: int, seed: int = 0):
    """One reusable group of residuals and final states, padded like a capture's."""
    rng = np.random.default_rng(seed)
    resid = rng.standard_normal((chunk, n_layers1, n_tokens, hidden), dtype=np.float32).astype(np.float16)
    final = rng.standard_normal((chunk, n_tokens, hidden), dtype=np.float32).astype(np.float16)
    lengths = rng.integers(n_tokens // 2, n_tokens + 1, chunk)
    for row, n in enumerate(lengths):
        resid[row, :, n:] = np.nan
        final[row, n:] = np.nan
    return [slice(s, min(s + chunk, n_prompts)) for s in range(0, n_prompts, chunk)], resid, final, lengths


def write_ours(path: Path, n_prompts: int, n_layers1: int, n_tokens: int, hidden: int, chunking, data) -> None:
    from store.testing import tiny_template
    from store.writer import StoreWriter

    groups, resid, final, lengths = data
    template = tiny_template(n_prompts=n_prompts, n_layers1=n_layers1, hidden=hidden, store_dtype="float16",
                             lengths=(*(int(lengths[i % len(lengths)]) for i in range(n_prompts - 1)), n_tokens),
                             chunking=chunking)
    writer = StoreWriter.create(path, template)
    for p in range(4):
        for group in groups:
            size = group.stop - group.start
            writer.write_region(p, group, resid[:size], final[:size])
    writer.finalize({})


def write_raw(path: Path, n_prompts: int, n_layers1: int, n_tokens: int, hidden: int, chunking, data) -> None:
    import zarr

    groups, resid, final, _ = data
    codec = [zarr.codecs.ZstdCodec(level=3)]
    root = zarr.open_group(str(path), mode="w")
    resid_a = root.create_array("resid", shape=(4, n_prompts, n_layers1, n_tokens, hidden), dtype="float16",
                                chunks=(1, chunking.prompt, chunking.layer, n_tokens, hidden), compressors=codec,
                                fill_value=np.nan)
    final_a = root.create_array("final", shape=(4, n_prompts, n_tokens, hidden), dtype="float16",
                                chunks=(1, chunking.prompt, n_tokens, hidden), compressors=codec, fill_value=np.nan)
    for p in range(4):
        for group in groups:
            size = group.stop - group.start
            resid_a[p, group] = resid[:size]
            final_a[p, group] = final[:size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="gpt2-small", choices=sorted(SHAPES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts")
    parser.add_argument("--dir", default=None, help="where the stores are written (default: a temp dir)")
    args = parser.parse_args()

    from benchmarks.common import machine
    from store.chunking import choose_chunking

    n_layers1, hidden = SHAPES[args.shape]
    chunking = choose_chunking([args.tokens] * args.prompts, n_layers1, hidden, 2)
    data = groups_of(args.prompts, chunking.prompt, n_layers1, args.tokens, hidden)
    nbytes = 4 * args.prompts * (n_layers1 + 1) * args.tokens * hidden * 2
    work = Path(args.dir or tempfile.mkdtemp(prefix="resdiff-write-"))
    runs: dict[str, list[float]] = {"ours": [], "raw": []}
    for attempt in range(args.repeat + 1):  # the first round warms imports and the page cache
        for name, write in (("raw", write_raw), ("ours", write_ours)):
            path = work / f"{name}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            start = time.perf_counter()
            write(path, args.prompts, n_layers1, args.tokens, hidden, chunking, data)
            if attempt:
                runs[name].append(time.perf_counter() - start)
            shutil.rmtree(path, ignore_errors=True)
    best = {k: min(v) for k, v in runs.items()}
    report = {
        "machine": machine(), "shape": args.shape, "prompts": args.prompts, "tokens": args.tokens,
        "chunks": [chunking.prompt, chunking.layer], "MiB": round(nbytes / 2**20, 1),
        "seconds": {k: round(v, 3) for k, v in best.items()},
        "all_runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
        "MiB_per_s": {k: round(nbytes / 2**20 / v, 1) for k, v in best.items()},
        "ours_over_raw_throughput": round(best["raw"] / best["ours"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
