"""Activation-loader throughput against a raw sequential read of the same chunks, in one run.

A synthetic float16 store of the GPT-2-small width (768) with ragged prompts (20-400
tokens, the store's own format-2 chunking), ``--prompts`` of them. Measured, best of
``--repeat``, one process each, the loader's construction (selection, massive positions)
not counted:

  raw     every block the loader reads (its (prompt chunk, token chunk) units, both passes),
          read with zarr in store order and dropped: no selection, conversion or shuffling
  loader  one shuffled epoch of ``activation_loader(layer, passes=("BB", "SS"))``, batches of
          4,096 drawn from a 256 MiB shuffle buffer, as torch tensors

Target loader / raw throughput >= 0.7, from a local path and from an fsspec URL
(``memory://``, the same store copied into fsspec's in-memory file system).

    python benchmarks/loader.py --prompts 400 --repeat 3 [--layout chunks]

With ``--layout both`` it compares the two layouts instead: the same prompts written as shards
(format 4) and as chunk files (format 3), one local epoch of each in turn, ``--repeat`` times
(alternating, and in flipped order each time, so that drift and order reach both alike), best of each.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit_report, machine  # noqa: E402


def build(path: Path, n_prompts: int, layout: str = "shards") -> Path:
    """The synthetic store: chunk files (format 3's layout) or shards as a capture makes them (format 4)."""
    from dataclasses import replace

    from store.chunking import choose_chunking, shard_prompts
    from store.testing import write_tiny_store

    if (path / "zarr.json").exists():
        return path
    lengths = tuple(sorted(np.random.default_rng(0).integers(20, 401, n_prompts).tolist(), reverse=True))
    chunking = choose_chunking(list(lengths), 13, 768, 2)
    if layout == "shards":  # as capture --no-lens sizes them: its write buffers of one pass, 3 x 14 x 768 x 2
        chunking = replace(chunking, shard=shard_prompts(lengths, chunking, 3 * 14 * 768 * 2))
    return write_tiny_store(path, n_prompts=n_prompts, n_layers1=13, hidden=768, lengths=lengths,
                            store_dtype="float16", chunking=chunking)


def to_memory(path: Path) -> str:
    import fsspec

    fs = fsspec.filesystem("memory")
    for file in path.rglob("*"):
        if file.is_file():
            fs.pipe(f"/bench/{file.relative_to(path)}", file.read_bytes())
    return "memory://bench"


def raw_read(loader) -> tuple[float, int]:
    """The same blocks read with zarr alone, in store order (no selection, conversion or shuffling)."""
    from analysis.loader.reads import open_resid

    sel = loader.selection
    resid = open_resid(sel).array  # the zarr array itself, not the loader's direct chunk reads
    layer = sel.layer_index[0]
    start, rows = time.perf_counter(), 0
    for unit in sel.units:
        for p in sel.pass_index:
            resid[p, unit.rows, layer, unit.tokens, :]
        rows += unit.n
    return time.perf_counter() - start, rows


def epoch(loader) -> tuple[float, int]:
    start, rows = time.perf_counter(), 0
    for batch in loader:
        rows += len(batch)
    return time.perf_counter() - start, rows


def compare_layouts(work: Path, n_prompts: int, repeat: int) -> dict:
    """One local epoch of the loader on shards, then on chunk files, ``repeat`` times; the best of each."""
    from analysis import activation_loader

    loaders = {layout: activation_loader(build(work / f"loader-{n_prompts}-{layout}.zarr", n_prompts, layout),
                                         layer=6, passes=("BB", "SS"), batch_size=4096, shuffle_buffer="256MiB")
               for layout in ("shards", "chunks")}
    runs: dict[str, list[float]] = {layout: [] for layout in loaders}
    for attempt in range(repeat):  # the order flips each time: whichever runs second in a pair ran faster
        for layout in (("shards", "chunks") if attempt % 2 else ("chunks", "shards")):
            runs[layout].append(epoch(loaders[layout])[0])
    best = {layout: min(times) for layout, times in runs.items()}
    return {"machine": machine(), "prompts": n_prompts, "epoch_s": {k: round(v, 3) for k, v in best.items()},
            "shards_over_chunks_time": round(best["shards"] / best["chunks"], 3),
            "all_runs": {k: [round(t, 3) for t in v] for k, v in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--store-dir", default=None, help="keep the synthetic store here between runs")
    parser.add_argument("--layout", choices=("shards", "chunks", "both"), default="shards",
                        help="the store's layout: shards (format 4, what capture writes) or chunk files (format 3); "
                        "both: compare their local epochs, alternating")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    from analysis import activation_loader

    work = Path(args.store_dir or tempfile.mkdtemp(prefix="resdiff-loader-"))
    if args.layout == "both":
        emit_report(compare_layouts(work, args.prompts, args.repeat), args.out)
        if not args.store_dir:
            shutil.rmtree(work, ignore_errors=True)
        return
    path = build(work / f"loader-{args.prompts}-{args.layout}.zarr", args.prompts, args.layout)
    report: dict = {"machine": machine(), "prompts": args.prompts, "layout": args.layout,
                    "files": sum(1 for f in path.rglob("*") if f.is_file())}
    for where, store in (("local", path), ("memory://", to_memory(path))):
        loader = activation_loader(store, layer=6, passes=("BB", "SS"), batch_size=4096, shuffle_buffer="256MiB")
        runs = {"raw": [], "loader": []}
        for _ in range(args.repeat):
            runs["raw"].append(raw_read(loader))
            runs["loader"].append(epoch(loader))
        (raw_s, rows), (loader_s, loaded) = min(runs["raw"]), min(runs["loader"])
        assert rows == loaded == loader.n_rows
        report[where] = {"rows": rows, "units": len(loader.selection.units),
                         "MB_read": round(rows * 2 * 768 * 2 / 1e6, 1), "raw_s": round(raw_s, 3),
                         "loader_s": round(loader_s, 3), "loader_over_raw_throughput": round(raw_s / loader_s, 3),
                         "all_runs": {k: [round(s, 3) for s, _ in v] for k, v in runs.items()}}
    emit_report(report, args.out)
    if not args.store_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
