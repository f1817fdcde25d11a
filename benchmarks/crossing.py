"""Crossed passes' cost (issue 28): capture with ``--cross-layers`` / capture without, against the compute ratio.

The smollm2 pair, real ragged text (standard-library docstrings), residuals only (``--no-lens``: the
statistics cost per pass, not per block). A crossed pass ``B>S@L`` or ``S>B@L`` runs ``n - L`` of the ``n``
blocks (its lower part is carried from ``BB`` or ``SS``), so the compute ratio is
``1 + sum over passes of (n - L) / (4 n)``; the target is the measured time ratio <= 1.2 x that. Model loading
is timed apart and left out (the crossed capture loads the base model a second time). Rounds alternate the two
captures; each side's time is its best round.

    python benchmarks/crossing.py --prompts 100 --splits 0:30:5 --out crossing.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import emit_report, machine, timing_loads
from benchmarks.researcher import corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--splits", default="0:30:5")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()

    from capture.pipeline.job import run_capture
    from capture.plan.passes import parse_cross_layers
    from capture.settings import CaptureSettings

    work = Path(tempfile.mkdtemp(prefix="resdiff-cross-"))
    texts = work / "texts.jsonl"
    with texts.open("w") as fh:
        for _, doc in corpus()[: args.prompts]:
            fh.write(json.dumps({"text": doc}) + "\n")
    common = {"model_pair": "smollm2", "prompts_files": [str(texts)], "device": "cpu", "lens": False}
    n_blocks = 30
    splits = parse_cross_layers(args.splits, n_blocks)
    compute = 1 + sum(2 * (n_blocks - s) for s in splits) / (4 * n_blocks)
    report = {"machine": machine(), "pair": "smollm2", "prompts": args.prompts, "splits": splits,
              "compute_ratio": round(compute, 3), "rounds": []}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        row = {}
        for side, extra in (("without", {}), ("with", {"cross_layers": args.splits})):
            store = work / f"{side}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            times: dict[str, float] = {}
            start = time.perf_counter()
            with timing_loads(times):
                run_capture(CaptureSettings(**common, **extra, store=str(store)), log=lambda *a: None,
                            progress=False)
            row[side] = round(time.perf_counter() - start - times.get("load", 0.0), 2)
            row[f"{side}_load"] = round(times.get("load", 0.0), 2)
            best[side] = min(best.get(side, float("inf")), row[side])
        report["rounds"].append(row)
        report.update({f"{k}_s": v for k, v in best.items()})
        report["time_ratio"] = round(best["with"] / best["without"], 3)
        report["time_over_compute"] = round(report["time_ratio"] / compute, 3)
        emit_report(report, args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
