"""50,000 short prompts on the tiny pair: a capture that is killed, resumed and opened.

Prompts are the first lines of standard-library docstrings (real text, a few to ~25 words),
repeated with a counter until there are ``--prompts`` of them. Steps:

1. ``capture --no-lens`` in a child process, SIGKILLed after ``--kill-after`` seconds;
2. the same command again, which resumes from the ``done`` flags and completes;
3. ``verify`` on the store;
4. ``xr.open_zarr(path)`` in a fresh interpreter (best of 3) and the size of the store's attributes.

    python benchmarks/scale.py --prompts 50000 --kill-after 60
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resdiff-scale-"))
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(short_texts(args.prompts)) + "\n")
    store = work / "s.zarr"
    command = [sys.executable, str(ROOT / "cli.py"), "capture", "--prompts-file", str(prompts), "--store", str(store),
               "--no-lens", "--quiet", "--cache-dir", args.models_dir or str(work / "models")]
    subprocess.run([*command[:-4], "--limit", "2", "--store", str(work / "warm.zarr"), "--no-lens",
                    "--cache-dir", args.models_dir or str(work / "models"), "--quiet"], check=True,
                   capture_output=True)  # builds the tiny pair first, outside the timing
    report: dict = {"prompts": args.prompts}
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
    import zarr

    done = zarr.open_group(str(store), mode="r")["done"][...]
    report["done_after_kill"] = f"{int(done.sum())}/{done.size}"
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    report["resume_s"] = round(time.perf_counter() - start, 1)
    verified = subprocess.run([sys.executable, str(ROOT / "cli.py"), "verify", str(store)], capture_output=True,
                              text=True)
    report["verify"] = verified.stdout.strip().splitlines()[0]
    probe = (f"import time, xarray as xr; t = time.perf_counter(); ds = xr.open_zarr({str(store)!r}); "
             "print(time.perf_counter() - t, ds.sizes['prompt'])")
    opens = [float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                  check=True).stdout.split()[0]) for _ in range(3)]
    report["open_zarr_s"] = round(min(opens), 3)
    report["attrs_bytes"] = len(json.dumps(zarr.open_group(str(store), mode="r").attrs.asdict()))
    report["store_bytes_on_disk"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
