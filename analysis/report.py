"""The text report of ``cli.py report``: per-layer (or per-token) summaries, hotspots and tracked
changes, per pair (or per pass), as aligned tables, with an optional row export.

Everything is computed from the lazy metrics; one ``dask.compute`` per table.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from analysis.metrics import PAIR_METRICS, PASS_METRICS, pair_metrics, pass_metrics, summarize_over
from analysis.reductions import hotspots
from analysis.tracked import tracked_changes
from capture.errors import UsageError

RUN_METRICS = (*PASS_METRICS, "entropy")


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def _metrics(ds: xr.Dataset, record_type: str, lens: str) -> xr.Dataset:
    if record_type == "pairwise":
        return pair_metrics(ds, lens)
    out = pass_metrics(ds)
    if "entropy" in ds:
        out["entropy"] = ds.entropy.sel(lens=lens, drop=True)
    return out


def build_report(ds: xr.Dataset, metrics: list[str] | None = None, axis: str = "layer",
                 record_type: str = "pairwise", top_n: int = 5, lens: str = "raw",
                 labels: list[str] | None = None, token_ids: list[int] | None = None) -> tuple[str, list[dict]]:
    """Return (text, rows): the report and the rows an export writes (hotspots and tracked changes)."""
    if record_type not in ("pairwise", "runs"):
        raise UsageError(f"--record-type must be pairwise or runs, got {record_type!r}")
    known = PAIR_METRICS if record_type == "pairwise" else RUN_METRICS
    metrics = metrics or (["norm_diff"] if record_type == "pairwise" else ["norm"])
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise UsageError(f"unknown {record_type} metric {unknown[0]!r}; known: {', '.join(known)}")
    lead = "pair" if record_type == "pairwise" else "pass_"
    table = _metrics(ds, record_type, lens)
    missing = [m for m in metrics if m not in table]
    if missing:
        raise UsageError(f"metric {missing[0]!r} needs data this store does not have (resid or lens statistics)")
    chosen = [str(x) for x in table[lead].values] if not labels else labels
    bad = [x for x in chosen if x not in set(map(str, table[lead].values))]
    if bad:
        raise UsageError(f"unknown {'pair' if lead == 'pair' else 'pass'} {bad[0]!r}; the store has "
                         f"{', '.join(map(str, table[lead].values))}")
    table = table.sel({lead: chosen})
    lines, rows = [], []
    for metric in metrics:
        summary, spots = dask.compute(summarize_over(table[metric], axis), hotspots(table[metric], top_n))
        tokens = ds.token_str.values
        for label in chosen:
            s = summary.sel({lead: label})
            lines.append(f"\n{metric} by {axis} ({'pair' if lead == 'pair' else 'pass'} {label}, lens {lens}):")
            lines.append(_table([axis, "mean", "std", "min", "max"],
                                [[int(i), float(s["mean"][j]), float(s["std"][j]), float(s["min"][j]),
                                  float(s["max"][j])] for j, i in enumerate(s[axis].values)]))
            h = spots.sel({lead: label})
            spot_rows = []
            for r in range(h.sizes["rank"]):
                prompt, layer, token = (int(h[k].values[r]) for k in ("prompt", "layer", "token"))
                if prompt < 0:
                    continue
                row = {"metric": metric, lead: label, "rank": r + 1, "prompt": prompt, "layer": layer,
                       "token_idx": token, "token": str(tokens[prompt, token]), "value": float(h.value.values[r])}
                spot_rows.append(row)
            rows += spot_rows
            lines.append(f"top {top_n} |{metric}| hotspots:")
            lines.append(_table(["rank", "prompt", "layer", "token_idx", "token", "value"],
                                [[r["rank"], r["prompt"], r["layer"], r["token_idx"], r["token"], r["value"]]
                                 for r in spot_rows]))
    if record_type == "pairwise" and "tracked_logit" in ds:
        ids = token_ids or [int(t) for t in ds.tracked_id.values]
        changes = tracked_changes(ds, 0.5, lens, ids).sel(pair=chosen).compute()
        found = changes.to_series().dropna()
        ordered = found.reindex(found.abs().sort_values(ascending=False).index).head(top_n)
        change_rows = [{"type": "logit_change", "token_id": int(q), "pair": p, "prompt": int(pr), "layer": int(la),
                        "token_idx": int(t), "token": str(ds.token_str.values[int(pr), int(t)]), "shift": float(v)}
                       for (q, p, pr, la, t), v in ordered.items()]
        rows += change_rows
        lines.append(f"\ntracked logit changes, |right - left| >= 0.5 (top {top_n}):")
        lines.append(_table(["token_id", "pair", "prompt", "layer", "token_idx", "token", "shift"],
                            [[r["token_id"], r["pair"], r["prompt"], r["layer"], r["token_idx"], r["token"],
                              r["shift"]] for r in change_rows]) if change_rows else "(none)")
    return "\n".join(lines).lstrip("\n"), rows


def check_export_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise UsageError(f"--export needs a .csv or .json path, got {path.name!r}")
    return path


def export_rows(rows: list[dict], path: str | Path) -> Path:
    """Write report rows as .csv (columns: the union of all keys) or .json."""
    path = check_export_path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else x))
    elif path.suffix == ".csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path
