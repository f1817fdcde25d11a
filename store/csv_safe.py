"""CSV cells that a spreadsheet cannot run: text beginning with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return is a formula to Excel, LibreOffice and Sheets (a crafted token such as ``=HYPERLINK(...)`` would become a
live link). Such text gets a leading ``'``, which those programs show as text; numbers are written as they are.

>>> [safe_cell(v) for v in ["=1+1", "-ing", "the", -0.5, "@x"]]
["'=1+1", "'-ing", 'the', -0.5, "'@x"]
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """``value`` with a leading ``'`` when it is text a spreadsheet would read as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def safe_row(row: dict | list) -> dict | list:
    """A CSV row (a mapping or a list of cells) with every cell made safe."""
    if isinstance(row, dict):
        return {k: safe_cell(v) for k, v in row.items()}
    return [safe_cell(v) for v in row]
