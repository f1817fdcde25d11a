"""``cli.py sweep``: capture several model pairs, one store each, with a manifest of what happened.

Each pair's outcome is one manifest row: ``success``, ``skipped`` (its store was already
complete) or ``failed`` with the one-line reason; a failed pair never stops the sweep. The
manifest is rewritten atomically after every pair, so it is valid whenever the sweep stops.
A rerun resumes: complete stores are skipped, interrupted ones resume from their ``done`` flags.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

from capture.models.registry import get_model_pair
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.atomic import atomic_output
from store.csv_safe import safe_row
from store.errors import ResdiffError, UsageError
from store.location import sanitize_label
from store.writer import StoreWriter

MANIFEST = "sweep_manifest.csv"
COLUMNS = ("pair", "status", "store", "seconds", "finished_at", "reason")


def _complete(store: Path) -> bool:
    """Complete as the capture job itself judges it: every region and every prompt's statistics done,
    and the closing attributes written."""
    if not (store / "zarr.json").exists():
        return False
    try:
        writer = StoreWriter(store)
        return writer.completeness().complete
    except Exception:  # unreadable: let the capture itself say what is wrong
        return False


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(safe_row(row) for row in rows)


def run_sweep(pairs: list[str], base_settings: CaptureSettings, store_dir: str | Path,
              log: Callable[[str], None] = print, progress: bool = False, client=None) -> tuple[Path, list[dict]]:
    """Capture each pair into ``store_dir/<pair>.zarr``; return (manifest path, rows). ``client``: as
    :func:`capture.pipeline.job.run_capture`."""
    names = [p.strip() for p in pairs if p.strip()]
    if not names:
        raise UsageError("--pair is empty; give registered pair names, e.g. --pair tiny,gpt2")
    if len(set(names)) != len(names):
        raise UsageError(f"--pair lists a pair twice: {names}; give each pair once")
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    manifest = store_dir / MANIFEST
    rows: list[dict] = []
    for name in names:
        row = {"pair": name, "store": "", "reason": ""}
        start = time.perf_counter()
        try:
            spec = get_model_pair(name)  # an unknown name fails here, with its suggestion, before any work
            store = store_dir / f"{sanitize_label(spec.name)}.zarr"
            row["store"] = str(store)
            if _complete(store) and not base_settings.overwrite:
                row["status"] = "skipped"
                row["reason"] = "store already complete"
            else:
                settings = dataclasses.replace(base_settings, model_pair=spec.name, store=str(store))
                run_capture(settings, log=log, progress=progress, client=client)
                row["status"] = "success"
        except ResdiffError as exc:
            row["status"], row["reason"] = "failed", str(exc)
        except Exception as exc:  # one broken pair must not cost the others
            row["status"], row["reason"] = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        row["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        rows.append(row)
        _write_manifest(manifest, rows)
        log(f"{name}: {row['status']}" + (f" ({row['reason']})" if row["reason"] else ""))
    return manifest, rows
