"""``export-json`` throughput and peak memory, at several store sizes (memory must stay flat).

Synthetic stores of a real capture's layout (GPT-2-small shape: 13 layer states x 768
dims, four passes, six pairs, top-20 lists, prompts of 60-100 tokens), built by the
script with random values (``store.testing``); no models. Each export runs in a fresh
process; peak memory is its ``ru_maxrss``, and ``import only`` is a process that
imported everything and opened the store without exporting.

    python benchmarks/export_json.py                      # 64 and 128 prompts
    python benchmarks/export_json.py --prompts 64,128,256 --store-dir DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from store.conversions.export_json import export_json
from store.reader import open_store
open_store({store!r})
start = time.perf_counter()
path = export_json({store!r}, {out!r}) if {export} else None
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "json_bytes": path.stat().st_size if path else 0}}))
"""


def build_store(path: Path, n_prompts: int, seed: int = 0) -> Path:
    from store.chunking import choose_chunking
    from store.testing import fill_lens_statistics, write_tiny_store

    if (path / "zarr.json").exists():
        return path
    lengths = tuple(int(n) for n in np.random.default_rng(seed).integers(60, 101, n_prompts))
    chunking = choose_chunking([max(lengths)] * n_prompts, 13, 768, 2)  # the format-1 tiles
    write_tiny_store(path, seed=seed, n_prompts=n_prompts, n_layers1=13, hidden=768, lengths=lengths,
                     store_dtype="float16", chunking=chunking)
    return fill_lens_statistics(path, vocab=50257, seed=seed)


def run_child(store: Path, out: Path, export: bool) -> dict:
    code = CHILD.format(root=str(Path(__file__).resolve().parents[1]), store=str(store), out=str(out), export=export)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="64,128", help="comma-separated store sizes in prompts")
    parser.add_argument("--store-dir", default=None, help="keep the synthetic stores here between runs")
    args = parser.parse_args()

    from benchmarks.common import machine
    from store.reader import open_store

    work = Path(tempfile.mkdtemp(prefix="resdiff-export-"))
    stores = Path(args.store_dir) if args.store_dir else work
    rows = []
    for n in (int(x) for x in args.prompts.split(",")):
        store = build_store(stores / f"export-{n}.zarr", n)
        tokens = int(open_store(store).n_tokens.sum())
        base = run_child(store, work / "out", export=False)
        run = run_child(store, work / "out", export=True)
        rows.append({"prompts": n, "tokens": tokens, "seconds": round(run["seconds"], 2),
                     "tokens_per_s": round(tokens / run["seconds"], 1),
                     "json_MiB": round(run["json_bytes"] / 2**20, 1),
                     "json_MiB_per_s": round(run["json_bytes"] / 2**20 / run["seconds"], 1),
                     "peak_MiB": round(run["peak"] / 2**20), "import_only_MiB": round(base["peak"] / 2**20),
                     "export_MiB": round((run["peak"] - base["peak"]) / 2**20)})
    print(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
