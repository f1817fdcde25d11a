"""Plain-text tables, as every command prints them."""

from __future__ import annotations

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
