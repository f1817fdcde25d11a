"""A researcher's first real run, end to end, under ``--memory-limit``: every command's time and peak memory.

Real weights (the ``smollm2`` pair) and real ragged text: ``--texts`` standard-library docstrings (functions,
classes and methods of many modules; a few words to several paragraphs) in one JSONL file and ``--chats``
chat conversations about them (one to three turns, rendered with the chat template) in another. Then, as
separate processes, each measured for wall time and peak RSS (the child's own ``ru_maxrss``):

  capture        the two files, default batching, lens statistics on ``--lens-layers`` (the CPU's cost)
  floor          one plain read of every real chunk of ``resid`` and ``final`` (straight from the chunk files),
                 the faster of two
  report, factorial, diff-lens, decompose, plot --html, loader-stats, export-netcdf (one prompt), export-json,
  info, verify: the README's commands, each with ``--memory-limit`` where it takes one

Targets (issue 23): peak RSS <= limit + 0.6 GB for every analysis command; report, factorial and diff-lens
<= 2x the floor, decompose and plot --html <= 3x.

    python benchmarks/researcher.py --texts 1000 --chats 100 --memory-limit 1GB --out researcher.json
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import emit_report, machine  # noqa: E402
from store.units import parse_size  # noqa: E402

MODULES = [
    "os", "json", "collections", "itertools", "functools", "pathlib", "re", "string", "textwrap", "inspect",
    "argparse", "logging", "shutil", "subprocess", "threading", "datetime", "decimal", "fractions", "statistics",
    "random", "heapq", "bisect", "contextlib", "dataclasses", "enum", "typing", "tempfile", "zipfile", "tarfile",
    "csv", "sqlite3", "email.message", "http.client", "urllib.request", "urllib.parse", "socket", "asyncio",
    "unittest", "difflib", "pprint", "copy", "weakref", "types", "abc", "numbers", "pickle", "shelve",
    "configparser", "traceback", "warnings", "ast", "tokenize", "doctest", "timeit", "ipaddress", "uuid", "base64",
    "mimetypes", "glob", "fnmatch", "filecmp", "io", "platform", "gzip", "bz2", "lzma", "struct", "queue",
    "sched", "selectors", "codecs", "locale", "gettext", "calendar", "operator", "optparse", "shlex", "cmd",
    "xml.dom.minidom", "xml.etree.ElementTree", "html.parser", "multiprocessing.pool", "concurrent.futures",
    "importlib.metadata", "hashlib", "hmac", "secrets", "smtplib", "ftplib", "imaplib", "poplib", "mailbox",
    "plistlib", "netrc", "wave", "colorsys", "graphlib", "zoneinfo", "pydoc", "pdb", "trace", "tracemalloc",
]
QUESTIONS = ["What does {name} do?", "Can you explain {name} to me?", "When would I use {name}?",
             "Summarise the documentation of {name}.", "Is {name} safe to use in a thread?"]


def corpus() -> list[tuple[str, str]]:
    """(qualified name, docstring) of public functions, classes and methods of many standard-library modules."""
    seen, out = set(), []
    warnings.simplefilter("ignore")
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            members = [(attr, obj)]
            if inspect.isclass(obj):
                members += [(f"{attr}.{m}", f) for m, f in sorted(vars(obj).items())
                            if not m.startswith("_") and inspect.isfunction(f)]
            for name, item in members:
                doc = inspect.getdoc(item)
                if doc and doc not in seen and len(doc) < 4000:
                    seen.add(doc)
                    out.append((f"{module_name}.{name}", doc.strip()))
    return out


def prompt_files(work: Path, n_texts: int, n_chats: int, seed: int = 0) -> tuple[Path, Path]:
    """``texts.jsonl`` (plain docstrings) and ``chats.jsonl`` (conversations about other docstrings)."""
    rng = random.Random(seed)
    items = corpus()
    rng.shuffle(items)
    if len(items) < n_texts + n_chats:
        raise SystemExit(f"only {len(items)} distinct docstrings; ask for fewer")
    texts, chats = work / "texts.jsonl", work / "chats.jsonl"
    with texts.open("w") as fh:
        for _, doc in items[:n_texts]:
            fh.write(json.dumps({"text": doc}) + "\n")
    with chats.open("w") as fh:
        for name, doc in items[n_texts:n_texts + n_chats]:
            answer = doc.split("\n\n")[0]
            messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
                        {"role": "assistant", "content": answer}]
            if rng.random() < 0.5:
                messages += [{"role": "user", "content": "Show me a short example, please."}]
            fh.write(json.dumps({"messages": messages}) + "\n")
    return texts, chats


def measured(args: list[str], log: Path) -> dict:
    """Run a command as a child process: wall seconds, the child's peak RSS, its exit code."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": round(time.perf_counter() - start, 2), "peak_rss_MB": round(usage.ru_maxrss / 1024),
            "rc": proc.returncode}


FLOOR = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from store.reader import ArrayRegions, open_store
ds = open_store({store!r})
n = np.asarray(ds.n_tokens.values)
cp, ct = ds.resid.data.chunks[1][0], ds.resid.data.chunks[3][0]
total = 0
for name in ("resid", "final"):
    src = ArrayRegions({store!r}, name)
    for start in range(0, len(n), cp):
        rows = slice(start, min(start + cp, len(n)))
        extent = min(ds.sizes["token"], -(-int(n[rows].max()) // ct) * ct)
        p_axis = ds[name].dims.index("prompt")
        index = [slice(None)] * ds[name].ndim
        index[p_axis], index[p_axis + (2 if name == "resid" else 1)] = rows, slice(0, extent)
        total += src.read(tuple(index)).nbytes
print(total)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=100)
    parser.add_argument("--memory-limit", default="1GB")
    parser.add_argument("--lens-layers", default="-1", help="lens statistics on these layers (default the last)")
    parser.add_argument("--work", help="working directory (kept); default a temporary one, removed")
    parser.add_argument("--store", help="reuse this capture instead of capturing (its time is then not measured)")
    parser.add_argument("--out", help="also write the JSON report here (rewritten after every command)")
    parser.add_argument("--skip", default="", help="comma-separated commands not to run (e.g. info,verify)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each command this many times: the fastest counts (as the floor's), the largest "
                             "peak RSS, and every run is listed (this machine's times vary by a third between runs)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="resdiff-researcher-"))
    work.mkdir(parents=True, exist_ok=True)
    cli, limit = [sys.executable, str(ROOT / "cli.py")], ["--memory-limit", args.memory_limit]
    results: dict[str, dict] = {}
    store = Path(args.store) if args.store else work / "run.zarr"
    if not args.store:
        texts, chats = prompt_files(work, args.texts, args.chats)
        results["capture"] = measured([*cli, "capture", "--pair", "smollm2", "--prompts-file", str(texts),
                                       "--prompts-file", str(chats), "--lens-layers", args.lens_layers, "--store",
                                       str(store), "--overwrite", "--quiet"], work / "capture.log")
    # the floor twice, the faster counted: the first read may find the store out of the page cache, where the
    # commands after it find it in (a cold first read had made every ratio look better than it is)
    floors = [measured([sys.executable, "-c", FLOOR.format(root=str(ROOT), store=str(store))], work / "floor.log")
              for _ in range(2)]
    results["floor"] = min(floors, key=lambda f: f["seconds"]) | {"runs": [f["seconds"] for f in floors]}
    commands = {
        "info": ["info", str(store)],
        "verify": ["verify", str(store)],
        "report": ["report", str(store), *limit],
        "factorial": ["factorial", str(store), *limit],
        "diff-lens": ["diff-lens", str(store), *limit],
        "decompose": ["decompose", str(store), "--overwrite", "--quiet", *limit],
        "plot --html": ["plot", str(store), "--html", "--quiet", "--out", str(work / "plots"), *limit],
        "loader-stats": ["loader-stats", str(store), "--layer", "20", "--pass-pair", "BB-SS"],
        "export-netcdf": ["export-netcdf", str(store), str(work / "one.nc"), "--sel", "prompt=3"],
        "export-json": ["export-json", str(store), "--out", str(work / "json")],
    }
    skip = set(filter(None, args.skip.split(",")))
    commands = {name: command for name, command in commands.items() if name not in skip}
    for name, command in commands.items():
        log = work / f"{name.replace(' ', '_')}.log"
        runs = [measured([*cli, *command], log) for _ in range(max(1, args.repeat))]
        results[name] = min(runs, key=lambda r: r["seconds"]) | {
            "peak_rss_MB": max(r["peak_rss_MB"] for r in runs), "rc": max((r["rc"] for r in runs), key=abs)}
        if len(runs) > 1:
            results[name]["runs"] = [r["seconds"] for r in runs]
        results[name]["said"] = log.read_text().strip().splitlines()[-1][:200]
        if args.out:  # every figure on disk as soon as it is measured
            Path(args.out).write_text(json.dumps(results, indent=2))
    floor = results["floor"]["seconds"]
    bound = parse_size(args.memory_limit, "--memory-limit") / 2**20 + 600
    targets = {"report": 2, "factorial": 2, "diff-lens": 2, "decompose": 3, "plot --html": 3}
    for name, factor in ((k, v) for k, v in targets.items() if k in results):
        results[name]["over_floor"] = round(results[name]["seconds"] / floor, 2)
        results[name]["time_target_met"] = results[name]["over_floor"] <= factor
    for name in commands:
        results[name]["memory_target_met"] = results[name]["peak_rss_MB"] <= bound
    report = {"machine": machine(), "pair": "smollm2", "texts": args.texts, "chats": args.chats,
              "memory_limit": args.memory_limit, "rss_bound_MB": round(bound), "lens_layers": args.lens_layers,
              "store": ((work / "capture.log").exists() and (work / "capture.log").read_text()[-600:]) or str(store),
              "results": results}
    emit_report(report, args.out)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
