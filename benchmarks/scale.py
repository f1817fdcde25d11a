"""50,000 short prompts on the tiny pair: a capture that is killed, resumed and opened.

Prompts are the first lines of standard-library docstrings (real text, a few to ~25 words),
repeated with a counter until there are ``--prompts`` of them. Steps:

1. ``capture --no-lens`` in a child process, SIGKILLed after ``--kill-after`` seconds;
2. the same command again, which resumes from the ``done`` flags and completes;
3. ``verify`` on the store;
4. ``xr.open_zarr(path)`` in a fresh interpreter (best of 3) and the size of the store's attributes;
5. the store's files (data files: all but ``zarr.json``) and MiB per data file, the peak RSS of the run that
   completed (its own ``ru_maxrss``) against ``capture --plan``'s predicted peak.

``--kill-after 0`` runs the capture once, to the end; ``--lens`` captures the lens statistics too.

    python benchmarks/scale.py --prompts 50000 --kill-after 60
    python benchmarks/scale.py --prompts 20000 --kill-after 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ragged import docstrings  # noqa: E402


def short_texts(n: int) -> list[str]:
    lines = sorted({doc.splitlines()[0].strip() for doc in docstrings()} - {""})
    return [f"{lines[i % len(lines)]} ({i // len(lines)})" if i >= len(lines) else lines[i] for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=50_000)
    parser.add_argument("--kill-after", type=float, default=60.0)
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--lens", action="store_true", help="capture the lens statistics too (default --no-lens)")
    parser.add_argument("--prompts-file", help="these prompts (one per line) instead of docstrings' first lines")
    parser.add_argument("--out", help="also write the JSON report here")
    parser.add_argument("--keep", action="store_true", help="keep the store (by default its folder is removed: "
                        "with --lens it is many GB)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resdiff-scale-"))
    prompts = work / "prompts.txt"
    if args.prompts_file:
        prompts = Path(args.prompts_file)
    else:
        prompts.write_text("\n".join(short_texts(args.prompts)) + "\n")
    store = work / "s.zarr"
    # the child reports its own peak RSS (ru_maxrss, KiB on Linux) on stderr when it ends
    runner = ("import resource, sys; sys.path.insert(0, sys.argv[1]); from cli import main; rc = main(sys.argv[2:]); "
              "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    command = [sys.executable, "-c", runner, str(ROOT), "capture", "--prompts-file", str(prompts), "--store",
               str(store), "--no-lens", "--quiet", "--cache-dir", args.models_dir or str(work / "models")]
    if args.lens:
        command.remove("--no-lens")
    models = args.models_dir or str(work / "models")
    subprocess.run([sys.executable, str(ROOT / "cli.py"), "capture", "--prompts-file", str(prompts), "--limit", "2",
                    "--store", str(work / "warm.zarr"), "--no-lens", "--cache-dir", models, "--quiet"], check=True,
                   capture_output=True)  # builds the tiny pair first, outside the timing
    planned = subprocess.run([sys.executable, str(ROOT / "cli.py"), *command[4:], "--plan"], capture_output=True,
                             text=True, check=True).stdout
    peak_line = next(line for line in planned.splitlines() if line.startswith("predicted peak"))
    report_plan = peak_line.split(":", 1)[1].split("=")[0].strip()
    report: dict = {"prompts": args.prompts, "lens": args.lens, "planned_peak": report_plan}
    import zarr

    if args.kill_after > 0:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            child.wait(timeout=args.kill_after)
            report["killed"] = False
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            report["killed"] = True
        report["first_run_s"] = round(time.perf_counter() - start, 1)
        done = zarr.open_group(str(store), mode="r")["done"][...]
        report["done_after_kill"] = f"{int(done.sum())}/{done.size}"
    start = time.perf_counter()
    finished = subprocess.run(command, check=True, capture_output=True, text=True)
    report["resume_s" if args.kill_after > 0 else "capture_s"] = round(time.perf_counter() - start, 1)
    peak = [line.split()[1] for line in finished.stderr.splitlines() if line.startswith("PEAK_KIB")]
    report["measured_peak_MiB"] = round(int(peak[-1]) / 1024, 1) if peak else None
    verified = subprocess.run([sys.executable, str(ROOT / "cli.py"), "verify", str(store)], capture_output=True,
                              text=True)
    report["verify"] = verified.stdout.strip().splitlines()[0]
    probe = (f"import time, xarray as xr; t = time.perf_counter(); ds = xr.open_zarr({str(store)!r}); "
             "print(time.perf_counter() - t, ds.sizes['prompt'])")
    opens = [float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  check=True).stdout.split()[0]) for _ in range(3)]
    report["open_zarr_s"] = round(min(opens), 3)
    report["attrs_bytes"] = len(json.dumps(zarr.open_group(str(store), mode="r").attrs.asdict()))
    files = [f for f in store.rglob("*") if f.is_file()]
    data = [f for f in files if f.name != "zarr.json"]
    report["store_bytes_on_disk"] = sum(f.stat().st_size for f in files)
    report["files"], report["data_files"] = len(files), len(data)
    report["directories"] = sum(1 for d in store.rglob("*") if d.is_dir())
    report["mib_per_data_file"] = round(sum(f.stat().st_size for f in data) / 2**20 / max(1, len(data)), 2)
    report["chunking"] = zarr.open_group(str(store), mode="r").attrs["chunking"]
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if args.keep:
        print(f"kept {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
