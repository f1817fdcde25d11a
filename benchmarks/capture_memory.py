"""Capture peak memory: measured against the plan's prediction and against the size of one model.

Each capture runs in a fresh child process, which first builds the plan (``capture
--plan``'s numbers, from configs only), then captures and reports its own peak: RSS
(``ru_maxrss``) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Target (issue 8): the capture's peak above the process baseline is at most one model
+ the other model's input embedding + lens weights + one batch of activations, + 10%.
``--cap`` adds one run inside a cgroup (v1 memory controller, needs root) whose limit
is below the two models' weights together, to show that the capture completes there.

    python benchmarks/capture_memory.py                          # gpt2-small and qwen0.5b shapes, CPU
    python benchmarks/capture_memory.py --shapes qwen0.5b --cap
    python benchmarks/capture_memory.py --shapes minitron8b --device cuda --dtype bfloat16 --lens on --max-memory 24GB
    python benchmarks/capture_memory.py child --base B --sft S --store X.zarr   # one measurement
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def child(args: argparse.Namespace) -> None:
    """Plan, capture, and print one JSON line: the prediction and the measured peak."""
    import torch

    from benchmarks.common import prompt_set
    from capture.pipeline.job import run_capture
    from capture.plan.memory import plan_capture
    from capture.settings import CaptureSettings

    settings = CaptureSettings(base=args.base, sft=args.sft, prompts=prompt_set(args.prompts), device=args.device,
                               lens=not args.no_lens, batch_size=args.batch_size, store=args.store, overwrite=True,
                               dtype=args.dtype, max_memory=args.max_memory)
    plan = plan_capture(settings, log=lambda msg: None)
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    run_capture(settings, log=lambda msg: None, progress=False)
    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"predicted": plan.peak, "baseline": plan.baseline, "measured": int(peak),
                      "steps": {s.title: s.parts for s in plan.steps}}))


def measure(base: Path, sft: Path, store: Path, *, lens: bool = True, prompts: str = "dev", device: str = "cpu",
            batch_size: int = 4, dtype: str = "float32", cgroup: Path | None = None,
            max_memory: str | None = None) -> dict:
    """Run :func:`child` in a fresh process (inside ``cgroup`` if given) and return its report."""
    cmd = [sys.executable, __file__, "child", "--base", str(base), "--sft", str(sft), "--store", str(store),
           "--prompts", prompts, "--device", device, "--batch-size", str(batch_size), "--dtype", dtype]
    cmd += [] if lens else ["--no-lens"]
    cmd += ["--max-memory", max_memory] if max_memory else []

    def join_cgroup() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=join_cgroup, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"capture child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_model_target(report: dict, fp, lens: bool) -> int:
    """Issue 8's bound above the baseline: one model, the other's input embedding, the lens weights
    (one vocabulary x hidden matrix per model) and one batch of activations, + 10%."""
    itemsize = fp.embedding // (fp.vocab * fp.hidden)
    batch = max(parts.get("activations", 0) for parts in report["steps"].values())
    lenses = 2 * fp.vocab * fp.hidden * itemsize if lens else 0
    return int(1.1 * (fp.params + fp.embedding + lenses + batch))


def evict_from_page_cache(*model_dirs: Path) -> None:
    """Drop the checkpoints' pages from the page cache, so that the capped run is charged for reading them."""
    for folder in model_dirs:
        for file in Path(folder).glob("*.safetensors"):
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def make_cgroup(limit: int) -> Path:
    group = CGROUP_ROOT / f"resdiff-bench-{os.getpid()}"
    group.mkdir()
    (group / "memory.limit_in_bytes").write_text(str(limit))
    swap = group / "memory.memsw.limit_in_bytes"
    if swap.exists():
        swap.write_text(str(limit))
    return group


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    one = sub.add_parser("child")
    for name in ("--base", "--sft", "--store"):
        one.add_argument(name, required=True)
    one.add_argument("--prompts", default="dev")
    one.add_argument("--device", default="cpu")
    one.add_argument("--dtype", default="float32")
    one.add_argument("--batch-size", type=int, default=4)
    one.add_argument("--no-lens", action="store_true")
    one.add_argument("--max-memory")
    parser.add_argument("--shapes", default="gpt2-small,qwen0.5b")
    parser.add_argument("--prompts", default="dev", choices=["dev", "64x100"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--lens", default="both", choices=["both", "on", "off"], help="captures with statistics or not")
    parser.add_argument("--max-memory", help="the captures' --max-memory (refused if the plan is over it)")
    parser.add_argument("--cap", action="store_true", help="also run the last shape under a cgroup memory cap")
    parser.add_argument("--cap-fraction", type=float, default=0.75,
                        help="the cap as a fraction of the two models' weights together (default 0.75)")
    args = parser.parse_args()
    if args.mode == "child":
        child(args)
        return

    from benchmarks.common import build_pair, machine
    from capture.plan.budget import model_footprint

    work = Path(tempfile.mkdtemp(prefix="resdiff-mem-"))
    models = Path(args.models_dir) if args.models_dir else work
    rows = []
    for shape in args.shapes.split(","):
        base, sft = build_pair(shape, models, dtype=args.dtype,
                               device="cuda" if args.device.startswith("cuda") else "cpu")
        fp = model_footprint(str(base), args.dtype, args.device)
        model_bytes = fp.params
        for lens in {"both": (False, True), "on": (True,), "off": (False,)}[args.lens]:
            report = measure(base, sft, work / f"{shape}.zarr", lens=lens, prompts=args.prompts, device=args.device,
                             dtype=args.dtype, max_memory=args.max_memory)
            above = report["measured"] - report["baseline"]
            target = one_model_target(report, fp, lens)
            rows.append({"shape": shape, "lens": lens, "model_MiB": model_bytes / 2**20,
                         "baseline_MiB": report["baseline"] / 2**20, "measured_MiB": report["measured"] / 2**20,
                         "predicted_MiB": report["predicted"] / 2**20,
                         "error": report["predicted"] / report["measured"] - 1,
                         "above_baseline_MiB": above / 2**20, "target_MiB": target / 2**20,
                         "target_met": above <= target})
    if args.cap:
        limit = int(args.cap_fraction * 2 * model_bytes)  # below the two models' weights together
        group = make_cgroup(limit)
        evict_from_page_cache(base, sft)
        try:
            report = measure(base, sft, work / "capped.zarr", prompts=args.prompts, device=args.device,
                             dtype=args.dtype, cgroup=group)
            usage = int((group / "memory.max_usage_in_bytes").read_text())
            rows.append({"shape": shape, "capped_at_MiB": limit / 2**20, "two_models_MiB": 2 * model_bytes / 2**20,
                         "completed": True, "cgroup_max_usage_MiB": usage / 2**20,
                         "failcnt": int((group / "memory.failcnt").read_text()),
                         "measured_MiB": report["measured"] / 2**20})
        finally:
            group.rmdir()
    print(json.dumps({"machine": machine(), "device": args.device, "dtype": args.dtype, "prompts": args.prompts,
                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
