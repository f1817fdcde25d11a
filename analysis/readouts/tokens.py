"""Tokens as text: decoded from the base checkpoint's tokenizer, shown visibly, told apart by kind.

Every table and figure names tokens through these (`` the`` rather than ``Ġthe``, ``␣the`` in a
table cell, special and template tokens as ``special``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import xarray as xr

from store.location import find_model_dir


def token_texts(ds: xr.Dataset, ids: np.ndarray) -> list[str]:
    """Readable text of token ids (`` the`` rather than ``Ġthe``), from the base checkpoint's tokenizer.json;
    the raw pieces from the store where there is none; "" for -1 (no token)."""
    path = _tokenizer_json(ds)
    if path is not None:
        tokenizer = _tokenizer(str(path))
        # special tokens (<|im_start|>...) decode to their own text, not to nothing
        return [tokenizer.decode([int(i)], skip_special_tokens=False) if i >= 0 else "" for i in ids]
    return [str(i) if i >= 0 else "" for i in ids]


_VISIBLE = str.maketrans({" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"})


def visible(text: str) -> str:
    r"""A token's text as a table cell shows it: spaces and line breaks drawn (``␣``, ``⏎``, ``⇥``), never blank.

    >>> visible(" the"), visible("\n\n"), visible("<|im_start|>"), visible("")
    ('␣the', '⏎⏎', '<|im_start|>', '∅')
    """
    return str(text).translate(_VISIBLE) if text else "∅"


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    """A tokenizer.json loaded once per process (a large vocabulary takes a tenth of a second to parse)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def _tokenizer_json(ds: xr.Dataset) -> Path | None:
    base = ds.attrs.get("models", {}).get("base", {})
    found = find_model_dir(base, ds.encoding.get("source"), "tokenizer" if base.get("tokenizer") else "ref")
    path = found / "tokenizer.json" if found else None
    return path if path is not None and path.exists() else None


def token_kinds(ds: xr.Dataset) -> xr.DataArray:
    """(prompt, token): ``special`` for the tokenizer's special tokens and a chat template's own tokens,
    ``text`` for the rest, ``""`` on padding; for grouping (``factorial_shares(ds, by=token_kinds(ds))``)."""
    path = _tokenizer_json(ds)
    special: set[int] = set()
    if path is not None:
        special = {int(t["id"]) for t in json.loads(path.read_text()).get("added_tokens", []) if t.get("special")}
    ids = np.asarray(ds.token_id.values)
    kinds = np.where(np.isin(ids, list(special)), "special", "text").astype(object)
    if "role" in ds.coords:
        kinds[np.asarray(ds.role.values) == "template"] = "special"
    kinds[ids < 0] = ""
    return xr.DataArray(kinds, dims=("prompt", "token"), coords={"prompt": ds.prompt}, name="kind")


def token_text_table(ds: xr.Dataset, prompt: int | None = None) -> np.ndarray:
    """Decoded text of every stored token, (prompt, token) (or one prompt's row), "" on padding; a store without
    token ids (imported from the legacy JSON) has the stored pieces."""
    if "token_id" not in ds:
        pieces = ds.token_str if prompt is None else ds.token_str.sel(prompt=prompt)
        return np.asarray(pieces.values, dtype=object)
    ids = np.asarray((ds.token_id if prompt is None else ds.token_id.sel(prompt=prompt)).values)
    unique = np.unique(ids[ids >= 0])
    lookup = dict(zip(unique.tolist(), token_texts(ds, unique), strict=True))
    lookup[-1] = ""
    return np.vectorize(lookup.__getitem__, otypes=[object])(ids) if ids.size else ids.astype(object)
