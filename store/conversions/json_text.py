"""The legacy JSON text of one prompt, written directly: the bytes of ``json.dumps(record, indent=2)``.

Python's ``json`` encoder runs in pure Python whenever it indents, which the legacy layout
needs: ~44 tokens/s for a GPT-2-small-shaped export. Almost all of a record is the per-layer,
per-token blocks of fixed shape, so they are written here from templates: every number of a
prompt converted at once (``tolist`` then ``repr``, which is what ``json`` does per float), the
lists and dictionaries joined with the separators and indentation ``indent=2`` uses. The small
rest of the record (names, metadata, token lists) still goes through ``json.dumps``, with a
marker where each ``layers`` block goes. ``tests/store/conversions`` holds this to the
``json.dumps`` text of :func:`store.conversions.legacy_records.prompt_records` byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np

_SPECIAL = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _rint_scaled(x: np.ndarray, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """``rint(x * 10**digits)`` and where it may differ from Python's correctly rounded ``round``: non-finite
    values, values too large to hold the integer exactly, and values within their own rounding error of a tie."""
    y = x * 10.0**digits
    with np.errstate(invalid="ignore"):
        unsure = ~np.isfinite(y) | (np.abs(y) >= 2.0**50) | (np.abs(y - np.floor(y) - 0.5) <= np.abs(y) * 2.0**-48)
    return np.rint(y), unsure


def rounded(values: np.ndarray, digits: int) -> list[float]:
    """``[round(x, digits) for x in values.ravel()]``, vectorised where that is exact.

    ``rint(x * 10**d) / 10**d`` equals Python's ``round`` except where :func:`_rint_scaled` is unsure;
    those few values go through Python's ``round``.

    >>> x = np.array([0.1234565, 2.5e-7, 1 / 3, 0.0078125])
    >>> rounded(x, 6), rounded(x, 6) == [round(v, 6) for v in x.tolist()]
    ([0.123456, 0.0, 0.333333, 0.007812], True)
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    scaled, unsure = _rint_scaled(x, digits)
    result = (scaled / 10.0**digits).tolist()
    for i in np.flatnonzero(unsure).tolist():
        result[i] = round(float(x[i]), digits)
    return result


def numbers(values: np.ndarray, digits: int | None = None) -> list[str]:
    """JSON text of every number of ``values`` (flattened, C order), as ``json.dumps`` writes each;
    ``digits`` rounds floats first with Python's ``round(x, digits)``.

    >>> numbers(np.array([1.5, np.nan, 3.0]))
    ['1.5', 'NaN', '3.0']
    """
    if values.size == 0:
        return []
    flat = values.ravel().tolist() if digits is None or values.dtype.kind in "iub" else rounded(values, digits)
    # One repr of the whole list runs the same per-number repr as json in C, without a Python call each.
    text = repr(flat)[1:-1].split(", ")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        text = [_SPECIAL.get(t, t) for t in text]
    return text


def list_texts(items: list[str], size: int, indent: int) -> list[str]:
    """Consecutive groups of ``size`` encoded items as JSON lists whose opening bracket is on a line
    indented ``indent``."""
    if not size:
        return ["[]"] * (len(items) if items else 0)
    pad = "\n" + " " * (indent + 2)
    head, sep, tail = "[" + pad, "," + pad, "\n" + " " * indent + "]"
    return [head + sep.join(items[i:i + size]) + tail for i in range(0, len(items), size)]


def _digit_columns(values: np.ndarray, digits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """ASCII columns (sign, integer digits[, '.', fraction digits]) of every value, 0 where a column is
    unused, and a mask of the values whose text this cannot write (they take the slow path)."""
    if digits is None:
        a, negative, slow = np.abs(values.astype(np.int64)), values < 0, np.zeros(values.shape, bool)
        whole, frac = a, None
    else:
        scaled, slow = _rint_scaled(values.astype(np.float64), digits)
        d = scaled / 10.0**digits
        with np.errstate(invalid="ignore"):  # Python's repr writes these in exponent form: slow path too
            slow |= ((np.abs(d) < 1e-4) & (d != 0)) | (np.abs(d) >= 1e9)
        a, negative = np.abs(np.where(slow, 0, scaled).astype(np.int64)), np.signbit(d) & ~slow
        whole, frac = a // 10**digits, a % 10**digits
    n_int = len(str(int(whole.max()))) if whole.size else 1  # integer digits the largest value needs
    width = 1 + n_int + (0 if frac is None else 1 + digits)
    cols = np.zeros((*values.shape, width), np.uint8)
    cols[..., 0] = np.where(negative, ord("-"), 0)
    rest = whole.copy()
    for j in reversed(range(n_int)):  # units first; a leading zero is dropped (the units digit never is)
        rest, digit = np.divmod(rest, 10)
        cols[..., 1 + j] = np.where((whole >= 10 ** (n_int - 1 - j)) | (j == n_int - 1), 48 + digit, 0)
    if frac is not None:
        cols[..., 1 + n_int] = ord(".")
        rest, nonzero_after = frac.copy(), np.zeros(frac.shape, bool)
        for j in reversed(range(digits)):  # last digit first; trailing zeros are dropped (the first never is)
            rest, digit = np.divmod(rest, 10)
            nonzero_after |= digit != 0
            cols[..., 2 + n_int + j] = np.where(nonzero_after | (j == 0), 48 + digit, 0)
    return cols, slow


def number_list_texts(values: np.ndarray, indent: int, digits: int | None = None) -> list[str]:
    """``list_texts(numbers(values, digits), values.shape[-1], indent)``, formed in numpy.

    Each number's characters and the separator after it are laid out as a row of bytes (0 where
    unused), the rows concatenated without their zeros, and the result cut at a marker after each
    list; lists with a value this cannot write exactly (see ``_digit_columns``) are written by
    :func:`list_texts`.
    """
    size, n_rows = values.shape[-1], int(np.prod(values.shape[:-1]))
    if size == 0 or n_rows == 0:
        return ["[]"] * n_rows
    rows = values.reshape(n_rows, size)
    cols, slow = _digit_columns(rows, digits)
    pad = "\n" + " " * (indent + 2)
    inner = np.frombuffer(("," + pad).encode(), np.uint8)
    seps = np.zeros((size, len(inner)), np.uint8)
    seps[:-1] = inner
    seps[-1, 0] = 1  # the marker that ends a list
    layout = np.concatenate([cols, np.broadcast_to(seps, rows.shape + seps.shape[-1:])], axis=-1)
    text = layout[layout != 0].tobytes().decode("ascii").split("\x01")[:-1]
    head, tail = "[" + pad, "\n" + " " * indent + "]"
    out = [head + t + tail for t in text]
    for row in np.flatnonzero(slow.any(axis=-1)).tolist():
        out[row] = list_texts(numbers(rows[row], digits), size, indent)[0]
    return out


def object_template(keys: list[str], indent: int) -> str:
    """A %-template of a JSON object with these keys (each value a ``%s``), its opening brace on a line
    indented ``indent``."""
    if not keys:
        return "{}"
    pad = "\n" + " " * (indent + 2)
    fields = ("," + pad).join(json.dumps(k).replace("%", "%%") + ": %s" for k in keys)
    return "{" + pad + fields + "\n" + " " * indent + "}"


def layers_text(records_kt: list[list[str]], indent: int) -> str:
    """The ``layers`` object whose line is indented ``indent``: ``records_kt[k]`` holds layer key ``k``'s
    token entries, each already the text ``"t": {...}`` with its own indentation (``indent + 4``)."""
    if not records_kt:
        return "{}"
    pad, close = " " * (indent + 2), "\n" + " " * (indent + 2) + "}"
    keys = [f'{pad}"{k}": ' + ("{\n" + ",\n".join(records) + close if records else "{}")
            for k, records in enumerate(records_kt)]
    return "{\n" + ",\n".join(keys) + "\n" + " " * indent + "}"


def marker(name: str) -> str:
    """A placeholder string for a block written separately (it cannot occur in real text: NUL bytes)."""
    return f"\x00{name}\x00"


def fill_markers(skeleton: dict, blocks: dict[str, Callable[[int], str]], indent: int = 0) -> str:
    """``json.dumps(skeleton, indent=2)``, every line indented ``indent`` more, with each marker string
    replaced by ``blocks[name](line_indent)``, ``line_indent`` being that of the marker's line (the
    blocks, nearly all of the text, are written at their final indentation, not re-indented)."""
    text = json.dumps(skeleton, indent=2)
    if indent:
        text = " " * indent + text.replace("\n", "\n" + " " * indent)
    pieces, at = [], 0
    for name, block in blocks.items():
        quoted = json.dumps(marker(name))
        where = text.index(quoted, at)
        line_start = text.rindex("\n", 0, where) + 1
        line_indent = len(text[line_start:where]) - len(text[line_start:where].lstrip(" "))
        pieces += [text[at:where], block(line_indent)]
        at = where + len(quoted)
    pieces.append(text[at:])
    return "".join(pieces)
