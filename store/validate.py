"""Validating a store's metadata against the schema when it is opened, before anything trusts it.

Readers index with ``n_tokens`` (slices, masks, negative slicing in the legacy export) and pick
passes by their labels, so an edited or damaged value would otherwise give wrong numbers and
exit 0. Each check raises :class:`~store.errors.StoreFormatError` naming the bad field: the
format version (an integer this resdiff reads), the types of the attributes the commands read,
the per-prompt lengths (``0 < n_tokens <= token``, ``n_tokens <= prompt_length``) and the pass
and pair labels.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.errors import StoreFormatError
from store.location import StorePath
from store.schema import FORMAT_ATTR, FORMAT_VERSION, READABLE_VERSIONS

# Attributes the commands read, with the JSON type each must have where present.
ATTR_TYPES: dict[str, type | tuple[type, ...]] = {
    "models": dict, "capture_settings": dict, "content_fingerprint": dict, "chunking": dict, "pass_plan": list,
    "saved_lens": dict, "lens_heads": dict, "store_dtype": str, "model_dtype": str, "device": str, "created_at": str,
    "completed_at": str, "imported_from": str, "pair_label": str, "statistics_only": bool,
}
_JSON_NAMES = {dict: "a mapping", list: "a list", str: "a string", bool: "true or false"}
MODEL_LABELS = ("base", "sft")


def check_version(path: StorePath, version: object) -> None:
    """Refuse a format version that is missing, not an integer, or not one this resdiff reads."""
    if version is None:
        raise StoreFormatError(path=path, detail=f"it has no {FORMAT_ATTR} attribute (not written by resdiff)")
    if type(version) is not int:  # bool is an int to Python, not to the format
        raise StoreFormatError(path=path, detail=f"its {FORMAT_ATTR} is {version!r}, not an integer; the attribute "
                                                 "was edited or damaged")
    if version > FORMAT_VERSION:
        raise StoreFormatError(path=path, detail=f"format version {version} is newer than this resdiff reads "
                                                 f"({FORMAT_VERSION}); upgrade resdiff")
    if version not in READABLE_VERSIONS:
        raise StoreFormatError(path=path, detail=f"its {FORMAT_ATTR} is {version}, which no resdiff wrote (versions "
                                                 f"{', '.join(map(str, READABLE_VERSIONS))}); the attribute was "
                                                 "edited or damaged")


def check_attrs(path: StorePath, attrs: dict) -> None:
    """Refuse attributes of the wrong JSON type (``models: "x"``, ``pass_plan: 3``...)."""
    for name, kind in ATTR_TYPES.items():
        if name in attrs and not isinstance(attrs[name], kind):
            raise StoreFormatError(path=path, detail=f"its attribute {name!r} is {attrs[name]!r:.60}, not "
                                                     f"{_JSON_NAMES[kind]}; the attribute was edited or damaged")
    for i, entry in enumerate(attrs.get("pass_plan", [])):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise StoreFormatError(path=path, detail=f"entry {i} of its attribute 'pass_plan' is {entry!r:.60}, not "
                                                     "a pass with a name")


def _fail(path: StorePath, detail: str) -> None:
    raise StoreFormatError(path=path, detail=detail + "; the store was edited or damaged (recapture it)")


def check_dataset(path: StorePath, ds: xr.Dataset) -> None:
    """Refuse per-prompt lengths and labels that break the schema; only the small 1-D labels are read."""
    if "n_tokens" in ds.coords:
        n_tokens = np.asarray(ds.n_tokens.values)
        if n_tokens.dtype.kind not in "iu":
            _fail(path, f"n_tokens has dtype {n_tokens.dtype}, not an integer")
        n_token = ds.sizes.get("token", 0)
        bad = np.flatnonzero((n_tokens < 1) | (n_tokens > n_token))
        if bad.size:
            i = int(bad[0])
            _fail(path, f"n_tokens of prompt {ds.prompt.values[i]} is {int(n_tokens[i])}, outside 1..{n_token} "
                        f"(the token dimension) ({bad.size} prompt(s) so)")
        if "prompt_length" in ds.coords:
            short = np.flatnonzero(np.asarray(ds.prompt_length.values) < n_tokens)
            if short.size:
                i = int(short[0])
                _fail(path, f"prompt_length of prompt {ds.prompt.values[i]} is {int(ds.prompt_length.values[i])}, "
                            f"fewer than its {int(n_tokens[i])} stored tokens")
    if "pass_" in ds.coords:
        names = [str(p) for p in ds.pass_.values]
        if len(set(names)) != len(names) or not all(names):
            _fail(path, f"the pass labels {names} are not unique, non-empty names")
        for label in ("model", "embedding", "unembedding"):
            if label in ds.coords:
                values = [str(v) for v in ds[label].values]
                if any(v not in MODEL_LABELS for v in values):
                    _fail(path, f"the {label} labels {values} are not all 'base' or 'sft'")
        if "pair" in ds.coords:
            for side in ("left", "right"):
                if side in ds.coords and any(str(v) not in names for v in ds[side].values):
                    _fail(path, f"the pair {side} labels {list(map(str, ds[side].values))} name passes the store "
                                f"does not have ({', '.join(names)})")


def check_lengths_match_ids(path: StorePath, ds: xr.Dataset, ids_pt: np.ndarray) -> None:
    """Refuse ``n_tokens`` that disagree with the stored token ids (real ids are >= 0 exactly on each prompt's
    first ``n_tokens`` positions): a length edited short would otherwise turn real tokens into padding."""
    n_tokens = np.asarray(ds.n_tokens.values)
    real_pt = np.asarray(ids_pt) >= 0
    expected_pt = np.arange(real_pt.shape[1])[None, :] < n_tokens[:, None]
    bad = np.flatnonzero((real_pt != expected_pt).any(axis=1))
    if bad.size:
        i = int(bad[0])
        _fail(path, f"n_tokens of prompt {ds.prompt.values[i]} is {int(n_tokens[i])} but it has "
                    f"{int(real_pt[i].sum())} stored token ids ({bad.size} prompt(s) so)")
