"""Plain-text tables, as every command prints them."""

from __future__ import annotations

import math

_CONTROL = str.maketrans({"\n": "\\n", "\r": "\\r", "\t": "\\t"})  # a token "\n" must not break a row


def table(header: list[str], rows: list[list]) -> str:
    r"""Right-aligned columns; floats with 4 decimals; line breaks and tabs in text shown escaped.

    >>> print(table(["token", "value"], [["\n", 1.0]]))
    token   value
       \n  1.0000
    """
    cells = [header] + [[f"{v:.4f}" if isinstance(v, float) else str(v).translate(_CONTROL) for v in row]
                        for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def estimate(value, low=None, high=None) -> str:
    """A number and its 95% interval as a cell: ``value (low..high)``; a dash for what was not computed (NaN),
    never a number.

    >>> estimate(0.5, 0.25, 0.75), estimate(float("nan")), estimate(0.5, float("nan"), 1.0)
    ('0.5000 (0.2500..0.7500)', '–', '0.5000 (–)')
    """
    value = float(value)
    if not math.isfinite(value):
        return "–"
    if low is None:
        return f"{value:.4f}"
    low, high = float(low), float(high)
    bounds = f"{low:.4f}..{high:.4f}" if math.isfinite(low) and math.isfinite(high) else "–"
    return f"{value:.4f} ({bounds})"


def estimate_of(at, name: str) -> str:
    """:func:`estimate` of variable ``name`` of a computed Dataset ``at`` (one cell), with ``name_low`` and
    ``name_high`` as its interval where ``at`` has them."""
    if f"{name}_low" not in at:
        return estimate(at[name])
    return estimate(at[name], at[f"{name}_low"], at[f"{name}_high"])


def dataset_rows(result, table_of=None) -> list[dict]:
    """The rows an export writes of a computed readout (an ``xarray.Dataset``): one per cell of each group of
    variables with the same dimensions, their coordinates as columns, ``table`` naming the group.

    >>> import xarray as xr
    >>> ds = xr.Dataset({"share": ("layer", [0.5, 0.25]), "share_low": ("layer", [0.4, 0.2])},
    ...                 coords={"layer": [0, 1]})
    >>> dataset_rows(ds)[0]
    {'table': 'layer', 'layer': 0, 'share': 0.5, 'share_low': 0.4}
    """
    groups: dict[tuple, list[str]] = {}
    for name, var in result.data_vars.items():
        groups.setdefault(var.dims, []).append(name)
    rows = []
    for dims, names in groups.items():
        frame = result[names].to_dataframe().reset_index()
        label = table_of(dims) if table_of else " x ".join(dims)
        for record in frame.to_dict("records"):
            rows.append({"table": label, **{k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}})
    return rows
