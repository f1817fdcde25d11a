"""What an activation loader will do, before any training: rows, units, memory, expected throughput."""

from __future__ import annotations

import time

import numpy as np

from analysis.loader.reads import open_resid, read_unit
from store.units import format_bytes


def loader_stats(loader, probe_units: int = 4) -> dict:
    """``loader.describe()`` plus a throughput estimate from reading ``probe_units`` units (a few seconds at most).

    ``expected_rows_per_s`` is that of the reads (what a shuffled epoch costs beyond the
    trainer's own work: the buffer's copies are far cheaper than the reads).
    """
    sel = loader.selection
    stats = loader.describe()
    stats["shuffle_buffer"] = format_bytes(stats["shuffle_buffer_bytes"])
    stats["unit_read"] = format_bytes(stats["unit_read_bytes"])
    if not sel.units:
        return {**stats, "expected_rows_per_s": None, "expected_epoch_s": 0.0}
    resid = open_resid(sel)
    picked = np.random.default_rng(0).permutation(len(sel.units))[:probe_units]
    start, rows = time.perf_counter(), 0
    for i in picked:
        rows += len(read_unit(resid, sel, sel.units[i]))
    seconds = max(time.perf_counter() - start, 1e-9)
    rate = rows / seconds
    return {**stats, "probed_units": len(picked), "expected_rows_per_s": round(rate),
            "expected_read_MBps": round(rate * stats["unit_read_bytes"] / max(sel.units[0].n, 1) / 1e6, 1),
            "expected_epoch_s": round(sel.n_rows / rate, 2)}
