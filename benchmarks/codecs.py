"""Which codec for the residuals: throughput and size on real activations.

Captures ``--prompts`` standard-library docstrings with the ``smollm2`` pair (real trained
weights; its residuals reach ~23,000 in a few dimensions) into a float16 store, takes the
store's own chunks of ``resid`` (real tokens and their in-chunk NaN padding, as capture
writes them) and encodes and decodes every chunk with each candidate, one thread, best of
``--repeat``. ``ratio`` is encoded / raw bytes (lower is smaller).

    python benchmarks/codecs.py --prompts 48 --repeat 3
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit_report, machine  # noqa: E402


def candidates() -> dict:
    import numcodecs
    from numcodecs import Blosc, Zstd

    numcodecs.blosc.set_nthreads(1)
    return {
        "none": None,
        "zstd-1": Zstd(level=1), "zstd-3": Zstd(level=3), "zstd-9": Zstd(level=9),
        "blosc-lz4": Blosc(cname="lz4", clevel=5, shuffle=Blosc.NOSHUFFLE),
        "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, typesize=2),
        "blosc-lz4-bitshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE, typesize=2),
        "blosc-zstd1-shuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE, typesize=2),
    }


def measure(codec, chunks: list[np.ndarray], repeat: int) -> dict:
    raw = sum(c.nbytes for c in chunks)
    if codec is None:  # the bytes codec alone: one copy out, one copy in
        encode = lambda chunks: [c.tobytes() for c in chunks]  # noqa: E731
        decode = lambda blobs: [np.frombuffer(b, dtype=np.float16).copy() for b in blobs]  # noqa: E731
    else:
        encode = lambda chunks: [codec.encode(c) for c in chunks]  # noqa: E731
        decode = lambda blobs: [codec.decode(b) for b in blobs]  # noqa: E731
    best_e = best_d = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        blobs = encode(chunks)
        best_e = min(best_e, time.perf_counter() - start)
        start = time.perf_counter()
        decode(blobs)
        best_d = min(best_d, time.perf_counter() - start)
    size = sum(len(b) for b in blobs)
    return {"ratio": round(size / raw, 3), "encode_MiB_s": round(raw / best_e / 2**20),
            "decode_MiB_s": round(raw / best_d / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--models-dir", default=None, help="where the smollm2 pair is built (kept between runs)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    import zarr
    from transformers import AutoTokenizer

    from benchmarks.ragged import ragged_set
    from capture.models.smollm import ensure_smollm_pair
    from capture.pipeline.job import run_capture
    from capture.settings import CaptureSettings

    work = Path(tempfile.mkdtemp(prefix="resdiff-codecs-"))
    base, sft = ensure_smollm_pair(args.models_dir or work / "models")
    prompts = ragged_set(AutoTokenizer.from_pretrained(base), args.prompts)
    store = work / "s.zarr"
    run_capture(CaptureSettings(base=base, sft=sft, prompts=prompts, lens=False, device="cpu", store=str(store)),
                progress=False)
    resid = zarr.open_group(str(store), mode="r")["resid"]
    grid = [range(0, s, c) for s, c in zip(resid.shape, resid.chunks, strict=True)]
    chunks = []
    for corner in itertools.product(*grid):
        where = tuple(slice(a, a + c) for a, c in zip(corner, resid.chunks, strict=True))
        block = resid[where]
        if not np.isnan(block).all():  # chunks holding only padding are never written
            chunks.append(np.ascontiguousarray(block))
    results = {name: measure(codec, chunks, args.repeat) for name, codec in candidates().items()}
    real = sum(int((~np.isnan(c[..., 0])).sum()) for c in chunks)
    report = {"machine": machine(), "pair": "smollm2", "prompts": len(prompts), "chunks": len(chunks),
              "chunk_shape": list(resid.chunks), "MiB": round(sum(c.nbytes for c in chunks) / 2**20, 1),
              "real_fraction": round(real * resid.shape[-1] / sum(c.size for c in chunks), 3), "codecs": results}
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
