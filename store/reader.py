"""Opening stores, checking that they are resdiff stores, and describing them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from store.errors import StoreFormatError, StoreNotFound
from store.location import CREATING_ATTR, StorePath, is_url, normalize, read_root_metadata, xarray_kwargs
from store.schema import DIMS, FORMAT_ATTR, FORMAT_VERSION
from store.units import format_bytes


def _read_attrs(path: StorePath, storage_options: dict | None = None) -> dict:
    if not is_url(path) and not Path(path).exists():
        raise StoreNotFound(path=path)
    try:
        raw = read_root_metadata(path, storage_options)
    except OSError as exc:
        detail = f"zarr.json is unreadable ({exc})"
        raise StoreFormatError(path=path, detail=detail) from None
    if raw is None:
        if is_url(path):
            raise StoreNotFound(path=path)
        raise StoreFormatError(path=path, detail="it has no zarr.json (not a Zarr v3 store)"
        )
    try:
        return json.loads(raw).get("attributes", {})
    except ValueError as exc:
        detail = f"zarr.json is unreadable ({exc})"
        raise StoreFormatError(path=path, detail=detail) from None


def is_unfinished(path: StorePath) -> bool:
    """True for a store at a URL whose template was being written when its capture stopped."""
    try:
        return bool(_read_attrs(normalize(path)).get(CREATING_ATTR))
    except (StoreNotFound, StoreFormatError):
        return False


def check_store(path: StorePath, storage_options: dict | None = None) -> dict:
    """Return the store's attributes after checking its format version."""
    path = normalize(path)
    attrs = _read_attrs(path, storage_options)
    if attrs.get(CREATING_ATTR):
        raise StoreFormatError(path=path, detail="its template was never finished (the capture that made it stopped "
            "early); rerun the capture command to replace it")
    version = attrs.get(FORMAT_ATTR)
    if version is None:
        raise StoreFormatError(path=path, detail=f"it has no {FORMAT_ATTR} attribute (not written by resdiff)"
        )
    if version > FORMAT_VERSION:
        raise StoreFormatError(path=path,
            detail=f"format version {version} is newer than this resdiff reads ({FORMAT_VERSION}); upgrade resdiff",
        )
    return attrs


def open_store(path: StorePath, storage_options: dict | None = None) -> xr.Dataset:
    """Open a store lazily (Dask-backed) after checking it.

    Equivalent to ``xr.open_zarr(path)`` plus validation; nothing is loaded.
    Regions not yet written read as NaN: mask with ``ds.done`` while a capture runs.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> ds = open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))
    >>> ds.resid.sel(pass_="SS").dims
    ('prompt', 'layer', 'token', 'dim')
    """
    path = normalize(path)
    check_store(path, storage_options)
    where = xarray_kwargs(path, storage_options)
    ds = xr.open_zarr(str(path), **where)
    # One-dimensional labels (pass models, prompt texts, pair sides...) are tiny and are read
    # to pick data, so load them now, straight from Zarr (no Dask computation); per-token
    # labels stay lazy like the data.
    names = [name for name, coord in ds.coords.items() if coord.ndim == 1 and name not in ds.dims]
    if not names:
        return ds
    eager = xr.open_zarr(str(path), chunks=None, **where)
    return ds.assign_coords({name: eager[name].load() for name in names})


def describe_store(path: str | Path) -> str:
    """A short human summary: dims, passes, models, completeness."""
    ds = open_store(path)
    attrs = ds.attrs
    done = np.asarray(ds["done"].values, dtype=bool)
    models = attrs.get("models", {})
    settings = attrs.get("capture_settings", {})
    content = (f"{format_bytes(ds['resid'].nbytes)} of residuals as {ds['resid'].dtype}" if "resid" in ds
               else f"statistics only, imported from {attrs.get('imported_from')}")
    lines = [
        f"store      {path}  (format {attrs.get(FORMAT_ATTR)}, {content})",
        "dims       " + ", ".join(f"{k}={ds.sizes[k]}" for k in DIMS if k in ds.sizes),
        f"base       {models.get('base', {}).get('ref', '?')}",
        f"sft        {models.get('sft', {}).get('ref', '?')}",
        f"model      {attrs.get('model_dtype', '?')} on {attrs.get('device', '?')}, "
        f"{settings.get('model_pair', settings.get('pair')) or 'custom pair'}",
        "passes     " + ", ".join(
            f"{p}=({m} LLM, {e} emb, {u} unemb)"
            for p, m, e, u in zip(ds.pass_.values, ds.model.values, ds.embedding.values, ds.unembedding.values,
                                  strict=True)
        ),
        f"prompts    {ds.sizes['prompt']} (tokens per prompt: {', '.join(str(int(n)) for n in ds.n_tokens.values)})",
        f"complete   {int(done.sum())}/{done.size} pass x prompt regions"
        + ("" if done.all() else "  (incomplete: rerun the same capture command to resume)"),
    ]
    if "lens_done" in ds:
        lens_done = np.asarray(ds["lens_done"].values, dtype=bool)
        tracked = ", ".join(str(t) for t in ds.tracked_str.values) if "tracked_str" in ds.coords else ""
        lines.append(
            f"lens       {', '.join(ds.lens.values)} lens; top-{ds.sizes.get('k', 0)}; "
            f"pairs {', '.join(ds.pair.values) or 'none'}; tracked: {tracked or 'none'}; "
            f"{int(lens_done.sum())}/{lens_done.size} prompts done"
            + ("; lens saved" if "saved_lens" in attrs else "")
        )
    if "resid" in ds:
        chunks = ds["resid"].encoding.get("chunks") or ds["resid"].data.chunksize
        lines.append(f"chunks     resid {tuple(int(c) for c in chunks)}")
    if attrs.get("completed_at"):
        lines.append(f"captured   {attrs['completed_at']}")
    return "\n".join(lines)
