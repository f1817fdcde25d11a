"""Writing report rows (hotspots, tracked changes) as .csv, .json or .parquet.

Rows of different kinds have different keys; every format gets the union of the
keys as columns, empty where a row has no value (the legacy export crashed on that).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from store.atomic import atomic_output
from store.csv_safe import safe_row
from store.errors import UsageError

SUFFIXES = (".csv", ".json", ".parquet")


def check_export_path(path: str | Path) -> Path:
    """The path, if its suffix is a known format and its directory exists; a one-line error otherwise."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UsageError(f"--export needs a .csv, .json or .parquet path, got {path.name!r}")
    if not path.parent.is_dir():
        raise UsageError(f"--export directory {str(path.parent)!r} does not exist; create it first")
    return path


def export_rows(rows: list[dict], path: str | Path) -> Path:
    """Write rows; columns are the union of all keys, in first-seen order.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "rows.csv"
    >>> _ = export_rows([{"metric": "kl", "value": 1.5}, {"type": "logit_change", "shift": -0.7}], out)
    >>> out.read_text().splitlines()
    ['metric,value,type,shift', 'kl,1.5,,', ',,logit_change,-0.7']
    """
    path = check_export_path(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_output(path) as tmp:  # never a half-written export under the final name
        if path.suffix == ".json":
            tmp.write_text(json.dumps(rows, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else x))
        elif path.suffix == ".csv":
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns)
                writer.writeheader()
                writer.writerows(safe_row(row) for row in rows)  # no cell a spreadsheet would run
        else:
            import pandas as pd

            pd.DataFrame(rows, columns=columns).to_parquet(tmp, engine="pyarrow", index=False)
    return path
