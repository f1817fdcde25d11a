"""Report benchmark: bounded memory on a store larger than the limit, and pair-metric read throughput.

Builds a synthetic float16 store (random residuals, padding on some tokens; no models)
of the Qwen2.5-0.5B shape (25 layer states x 896 dims) and measures, each in a fresh
process so that peak RSS belongs to one measurement:

  overhead  the process's footprint before any computation: interpreter, libraries,
            store metadata (what ``--memory-limit`` does not count);
  raw       a plain read of every ``resid`` chunk with zarr, one thread (no Dask);
  raw-dask  the same read through Dask with the same threads as ``metric``;
  metric    ``summarize_over(pair_metrics(ds).norm_diff, "layer")`` for all six pairs;
  report    ``cli.py report STORE --memory-limit LIMIT`` end to end (summaries,
            hotspots, seven-number summaries);
  decompose (with ``--decompose``) ``cli.py decompose STORE --memory-limit LIMIT`` once:
            Gram matrices of all six pairs at every layer, spectra, CP and Tucker.

and prints raw / metric (target >= 0.6: the metric reads at >= 60% of a raw read) and
peak RSS of ``report`` against LIMIT + overhead.

    python benchmarks/report.py                              # 2.2 GB store, 512 MB limit
    python benchmarks/report.py --prompts 64 --limit 400MB --store-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _child(mode: str, store: str, limit: str) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    if mode in ("raw-dask", "metric"):  # as cli.py does under --memory-limit
        from analysis.compute.context import share_one_heap

        share_one_heap()

    import dask
    import numpy as np

    from analysis import open_store, pair_metrics, summarize_over
    from analysis.compute.context import compute_on, parse_memory, tile_bytes

    ds = open_store(store)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if mode == "raw":
        import zarr

        resid = zarr.open_group(store, mode="r")["resid"]
        steps = [range(0, n, c) for n, c in zip(resid.shape, resid.chunks, strict=True)]
        for p in steps[0]:
            for i in steps[1]:
                for j in steps[2]:
                    resid[p, i:i + resid.chunks[1], j:j + resid.chunks[2]]
    elif mode in ("raw-dask", "metric"):
        with compute_on(memory_limit=parse_memory(limit), tile=tile_bytes(ds)) as where:
            if mode == "metric":
                summarize_over(pair_metrics(ds).norm_diff, "layer").compute()
            else:
                ds.resid.data.map_blocks(lambda x: np.zeros((1,) * x.ndim), chunks=(1,) * 5).sum().compute()
            threads = dask.config.get("num_workers")
        return {"seconds": time.perf_counter() - start, "threads": threads, "where": where, "before": before}
    return {"seconds": time.perf_counter() - start, "before": before}


def _run(args: list[str]) -> tuple[dict, int]:
    """Run a child process; return its JSON line (if any) and its peak RSS in bytes."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    last = out.strip().splitlines()[-1] if out.strip() else "{}"
    result = json.loads(last) if last.startswith("{") else {}
    result.setdefault("seconds", time.perf_counter() - start)
    return result, usage.ru_maxrss * 1024


def build_store(path: Path, n_prompts: int) -> None:
    from store.chunking import choose_chunking
    from store.testing import write_tiny_store

    n_layers1, n_tokens, hidden = 25, 128, 896
    lengths = tuple(n_tokens - (i % 5) * 12 for i in range(n_prompts))  # padding on four prompts in five
    chunking = choose_chunking([n_tokens] * n_prompts, n_layers1, hidden, 2)  # the format-1 tiles
    write_tiny_store(path, n_prompts=n_prompts, n_layers1=n_layers1, hidden=hidden, lengths=lengths,
                     store_dtype="float16", chunking=chunking)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=96, help="prompts in the synthetic store (96: 2.2 GB)")
    parser.add_argument("--limit", default="512MB", help="--memory-limit given to the report")
    parser.add_argument("--store-dir", help="keep the store here between runs (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest counts")
    parser.add_argument("--decompose", action="store_true", help="also time and measure `decompose` once")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "STORE", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.child[0] == "build":
        build_store(Path(args.child[1]), int(args.child[2]))
        return
    if args.child:
        print(json.dumps(_child(*args.child)))
        return

    from dask.utils import format_bytes, parse_bytes

    work = Path(args.store_dir or tempfile.mkdtemp(prefix="resdiff-bench-"))
    store = work / f"synthetic-{args.prompts}.zarr"
    if not (store / "zarr.json").exists():
        print(f"building {store} ...", file=sys.stderr)
        # In a child: a child's peak RSS counts the memory of the parent it was forked from.
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "build", str(store),
                        str(args.prompts)], check=True, cwd=ROOT)
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    report = [sys.executable, str(ROOT / "cli.py"), "report", str(store), "--memory-limit", args.limit, "--quiet"]
    runs: dict[str, list[float]] = {"raw": [], "raw-dask": [], "metric": [], "report": []}
    peaks: dict[str, list[int]] = {k: [] for k in runs}
    _run([*me, "metric", str(store), args.limit])  # warm-up: page cache, numba's on-disk cache
    overhead_result, _ = _run([*me, "overhead", str(store), args.limit])
    overhead = overhead_result["before"]
    threads = None
    for _ in range(args.repeat):
        for mode in ("raw", "raw-dask", "metric"):
            result, peak = _run([*me, mode, str(store), args.limit])
            runs[mode].append(result["seconds"])
            peaks[mode].append(peak)
            threads = result.get("threads", threads)
        result, peak = _run(report)  # wall time, process start included
        runs["report"].append(result["seconds"])
        peaks["report"].append(peak)
    limit = parse_bytes(args.limit)
    if args.decompose:
        result, peak = _run([sys.executable, str(ROOT / "cli.py"), "decompose", str(store), "--memory-limit",
                             args.limit, "--quiet", "--overwrite", "--out", str(work / "decomposition.zarr")])
        runs["decompose"], peaks["decompose"] = [result["seconds"]], [peak]
    best = {k: min(v) for k, v in runs.items()}
    summary = {
        "machine": f"CPU x{os.cpu_count()}", "store_bytes_on_disk": size, "store": format_bytes(size),
        "limit": format_bytes(limit), "store_over_limit": round(size / limit, 2), "threads": threads,
        "overhead": format_bytes(overhead), "seconds": {k: round(v, 2) for k, v in best.items()},
        "all_runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "peak_rss": {k: format_bytes(max(v)) for k, v in peaks.items()},
        "report_peak_minus_overhead": format_bytes(max(peaks["report"]) - overhead),
        "report_peak_within_limit_plus_overhead": max(peaks["report"]) <= limit + overhead,
        **({"decompose_peak_minus_overhead": format_bytes(max(peaks["decompose"]) - overhead),
            "decompose_peak_within_limit_plus_overhead": max(peaks["decompose"]) <= limit + overhead}
           if args.decompose else {}),
        "raw_over_metric": round(best["raw"] / best["metric"], 3),
        "raw_dask_over_metric": round(best["raw-dask"] / best["metric"], 3),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
