"""``export-json``: the legacy format-2 (multi-pass) JSON as a derived view of a store.

Byte-for-byte what the legacy tool's ``json.dump(records, indent=2)`` layout gives, records in
source order (``store.conversions.legacy_records`` defines them). The store is read one prompt
chunk at a time, each chunk once; the parent and worker processes (one per core in all) form
the records of whole chunks into spool files next to the output, and the parent then copies
them out in source order, so memory stays that of a chunk per process whatever the number of
prompts, and the disk needs about twice the JSON's size while the export runs.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import os
import tempfile
from collections import deque
from functools import partial
from pathlib import Path

import numpy as np
import xarray as xr

from store.atomic import atomic_output
from store.completeness import lens_note, require_residuals_done
from store.conversions.legacy_records import format1_records, prompt_text
from store.csv_safe import safe_row
from store.errors import NotExportable, UsageError
from store.location import current_storage_options, sanitize_label
from store.reader import open_store
from store.schema import lens_layers

META_NOTE = "Multi-pass residual comparison exported by resdiff from a Zarr store (derived view)."
MANIFEST_HEADER = "timestamp,entry,prompt_count,prompt_variants,multi_pass,json_path,log_path"
EXPORT_PROCESSES = max(1, min(8, os.cpu_count() or 1))  # the parent and its workers
MIN_BLOCKS_FOR_WORKERS = 4  # below this, starting worker processes costs more than it saves
BLOCK_BYTES = 256 * 2**20  # decoded store data a process holds at once (each of the processes)


def _prompt_texts(block: xr.Dataset, row: int, lens: str, single_pass: bool) -> list[bytes]:
    """The records of ``block``'s row ``row`` as they appear in the file (indented one level): format 1
    (one per pair) in the legacy single-pass mode, else one format-2 record."""
    if single_pass:
        texts = ["  " + json.dumps(record, indent=2).replace("\n", "\n  ")
                 for record in format1_records(block, row, lens)]
    else:
        texts = [prompt_text(block, row, lens, indent=2)]
    return [text.encode("ascii") for text in texts]


_opened: dict = {}  # per process: the store this process exports from


def _spool_chunk(store, storage_options, lens: str, start: int, size: int, spool_dir: str) -> tuple[str, list]:
    """Form the records of store rows ``start:start + size`` (a block of ``_blocks``) and append
    them to this process's spool file; return its path and each row's (row, offset, length)."""
    key = (str(store), repr(storage_options))
    if key not in _opened:
        _opened.clear()
        _opened[key] = open_store(store, storage_options=storage_options, dask=False)
    ds = _opened[key]
    block = ds.isel(prompt=slice(start, start + size)).load()
    single_pass = bool(ds.attrs.get("embedding_variants"))
    path = os.path.join(spool_dir, f"{os.getpid()}.spool")
    spans = []
    with open(path, "ab") as spool:
        for row in range(size):
            for data in _prompt_texts(block, row, lens, single_pass):
                spans.append((start + row, spool.tell(), len(data)))
                spool.write(data)
    return path, spans


def _blocks(ds: xr.Dataset) -> tuple[list[int], list[int]]:
    """The row blocks a process forms at once: whole prompt chunks (each read once), cut where one would
    hold more than ``BLOCK_BYTES`` in memory, or where there are fewer blocks than two per process
    (a cut block re-reads its chunk: more reading, but every core busy)."""
    per_prompt = sum(v.nbytes for v in ds.data_vars.values() if "prompt" in v.dims) / max(ds.sizes["prompt"], 1)
    chunks = ds.resid.chunks[ds.resid.dims.index("prompt")] if ds.resid.chunks else (ds.sizes["prompt"],)
    most = max(1, int(BLOCK_BYTES // max(per_prompt, 1)))
    starts, sizes, at = [], [], 0
    for chunk in chunks:
        pieces = max(-(-chunk // most), -(-2 * EXPORT_PROCESSES // len(chunks)) if EXPORT_PROCESSES > 1 else 1)
        bounds = np.linspace(0, chunk, min(pieces, chunk) + 1).astype(int).tolist()
        starts += [at + a for a in bounds[:-1]]
        sizes += [b - a for a, b in itertools.pairwise(bounds)]
        at += chunk
    return starts, sizes


def _spool_all(ds: xr.Dataset, store, storage_options, lens: str, spool_dir: str) -> list[list]:
    """Every store row's spans ``(spool path, offset, length)``, blocks formed here and on workers."""
    starts, sizes = _blocks(ds)
    spans: list[list] = [[] for _ in range(ds.sizes["prompt"])]

    def collect(path: str, rows: list) -> None:
        for row, offset, length in rows:
            spans[row].append((path, offset, length))

    tasks = deque((store, storage_options, lens, start, size, spool_dir)
                  for start, size in zip(starts, sizes, strict=True))
    n_workers = EXPORT_PROCESSES - 1  # the parent forms chunks too, from the start (workers take a second to spawn)
    if n_workers < 1 or len(tasks) < MIN_BLOCKS_FOR_WORKERS:
        while tasks:
            collect(*_spool_chunk(*tasks.popleft()))
        return spans
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: the parent runs zarr's event-loop thread, which a forked child would inherit half-held.
    with ProcessPoolExecutor(n_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Two chunks queued per worker, so that none waits while the parent is busy with its own.
        running = {pool.submit(_spool_chunk, *tasks.popleft()) for _ in range(min(2 * n_workers, len(tasks)))}
        while tasks or running:
            for future in [f for f in running if f.done()]:
                running.remove(future)
                collect(*future.result())
                if tasks:
                    running.add(pool.submit(_spool_chunk, *tasks.popleft()))
            if tasks:
                collect(*_spool_chunk(*tasks.popleft()))
            elif running:
                wait(running, return_when=FIRST_COMPLETED)
    return spans


def _copy(source: int, target: int, offset: int, length: int) -> None:
    """Append ``length`` bytes of file ``source`` from ``offset`` to file ``target`` (in the kernel
    where it can: ``copy_file_range``)."""
    while length > 0:
        try:
            done = os.copy_file_range(source, target, length, offset)
        except (AttributeError, OSError):  # no copy_file_range here, or not between these files
            os.write(target, os.pread(source, length, offset))
            return
        if done == 0:
            raise OSError(f"spool file ended {length} bytes early")
        offset, length = offset + done, length - done


def _write_json(ds: xr.Dataset, store, storage_options, lens: str, json_path: Path) -> Path:
    """The JSON file: every record in source order, the bytes of ``json.dump(all, indent=2)``."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(json_path) as staged, open(staged, "wb") as out, \
            tempfile.TemporaryDirectory(dir=json_path.parent, prefix=".spool-") as spool_dir:
        spans = _spool_all(ds, store, storage_options, lens, spool_dir)
        files = {path: open(path, "rb") for path in {p for row in spans for p, _, _ in row}}
        try:
            target = out.fileno()
            os.write(target, b"[")
            first = True
            for row in np.argsort(ds.prompt.values, kind="stable"):  # source order, whatever the store order
                for path, offset, length in spans[row]:
                    os.write(target, b"\n" if first else b",\n")
                    _copy(files[path].fileno(), target, offset, length)
                    first = False
            os.write(target, b"]" if first else b"\n]")
        finally:
            for f in files.values():
                f.close()
    return json_path


def _check_exportable(ds: xr.Dataset, path) -> None:
    missing = [v for v in ("entropy", "kl", "topk_id", "rise_id") if v not in ds]
    if missing:
        raise NotExportable(path=path, detail="it has no lens statistics (captured with --no-lens), which the "
                            "legacy JSON needs; recapture without --no-lens")
    fingerprint = ds.attrs.get("content_fingerprint", {})
    if fingerprint.get("positions", "all") != "all" or list(ds.layer.values) != list(range(ds.sizes["layer"])):
        kept = f"layers {', '.join(str(int(la)) for la in ds.layer.values)}" if fingerprint.get(
            "positions", "all") == "all" else f"positions {fingerprint.get('positions')}"
        raise NotExportable(path=path, detail=f"it holds only {kept} (--layers/--positions), and the legacy JSON "
                            "has every layer and token; read it with `report` or xarray, or capture without them")
    if lens_layers(ds) != [int(la) for la in ds.layer.values]:
        kept = ", ".join(map(str, lens_layers(ds)))
        raise NotExportable(path=path, detail=f"its lens statistics cover layers {kept} only (--lens-layers), "
                            "and the legacy JSON has them at every layer; capture without --lens-layers to export")
    require_residuals_done(ds)
    note = lens_note(ds)
    if note:
        raise NotExportable(path=path, detail=note)


def export_json(store: str | Path, out_dir: str | Path = "outputs/export", lens: str = "raw") -> Path:
    """Write ``multi_pass_<ts>_<label>.json``, its ``.meta.json`` sidecar and a manifest row.

    Files go to ``out_dir/<pair_label>/``, the manifest to ``out_dir/manifest_multi.csv``
    (the legacy ``h200_outputs_multi`` layout). A store captured in the legacy
    single-pass mode (``embedding_variants``) gives ``out_dir/residual_compare_<ts>_<sft>.json``
    in format 1, with no sidecar, as the old tool did. The JSON is written to a
    temporary name and renamed when complete, so a failed export leaves no partial file.
    """
    if lens not in ("raw", "norm"):
        raise UsageError(f"--lens must be raw or norm, got {lens!r}")
    ds = open_store(store)
    _check_exportable(ds, store)
    options = current_storage_options()  # the workers are fresh processes: hand them this process's options
    write = partial(_write_json, ds, store, options or None, lens)
    models = ds.attrs.get("models", {})
    base_ref, sft_ref = models.get("base", {}).get("ref", "base"), models.get("sft", {}).get("ref", "sft")
    label = sanitize_label(f"{base_ref}_to_{sft_ref}")
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%d_%H%M%S")
    if ds.attrs.get("embedding_variants"):  # legacy single-pass mode: format 1, no sidecar or manifest
        return write(Path(out_dir) / f"residual_compare_{stamp}_{sanitize_label(sft_ref)}.json")
    target = Path(out_dir) / label
    target.mkdir(parents=True, exist_ok=True)
    json_path = write(target / f"multi_pass_{stamp}_{label}.json")
    meta_path = target / f"{stamp}_{label}.meta.json"
    variants = list(dict.fromkeys(str(v) for v in ds.variant.values))
    meta = {"timestamp": stamp, "base_model": models.get("base", {}).get("ref"),
            "sft_model": models.get("sft", {}).get("ref"),
            "prompts_processed": len(set(int(i) for i in ds.prompt_index.values)), "prompt_variants": variants,
            "results_serialized": ds.sizes["prompt"], "multi_pass_runs": [str(p) for p in ds.pass_.values],
            "multi_pass_pairwise": [str(p) for p in ds.pair.values], "notes": META_NOTE}
    with atomic_output(meta_path) as staged:
        staged.write_text(json.dumps(meta, indent=2))
    manifest = Path(out_dir) / "manifest_multi.csv"
    new = not manifest.exists() or manifest.stat().st_size == 0
    with open(manifest, "a", newline="") as fh:
        if new:
            fh.write(MANIFEST_HEADER + "\n")
        csv.writer(fh).writerow(safe_row([now.strftime("%Y-%m-%dT%H:%M:%S"), label, ds.sizes["prompt"],
                                          "|".join(variants), "true", str(json_path.resolve()),
                                          str(meta_path.resolve())]))
    return json_path
