"""``cli.py verify``: check that a store is what its metadata says, one prompt block at a time.

Checks: format version and metadata (``store.validate``); dims, coords and their sizes;
labels that agree with the attributes (pass plan, store dtype, pairs); ``done`` and
``lens_done`` coverage; chunks present wherever a complete region needs them and decoding
with a matching checksum (``store.integrity``: every chunk with ``deep``, a sample of each
array otherwise); in every done region, residuals finite at real positions and NaN exactly
on padding; no infinities in any float variable. Memory stays at one prompt block of one variable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from store.chunking import chunk_slices, real_blocks, token_extent
from store.errors import CorruptChunk, ResdiffError
from store.integrity import corrupt_chunks, missing_chunks, stored_chunks
from store.location import is_url, normalize, xarray_kwargs, zarr_store
from store.reader import check_store, direct_regions, has_consolidated_metadata, open_store, validate_opened
from store.schema import DIMS
from store.writer import completeness

MAX_LISTED = 20  # problems of one kind listed before they are counted


def _structure(ds: xr.Dataset, attrs: dict) -> list[str]:
    problems = []
    for name, dims in (("resid", DIMS), ("final", ("pass_", "prompt", "token", "dim")), ("done", ("pass_", "prompt"))):
        if name not in ds and not (name in ("resid", "final") and attrs.get("imported_from")):
            problems.append(f"variable {name!r} is missing")
        elif name in ds and ds[name].dims != dims:
            problems.append(f"{name} has dims {ds[name].dims}, expected {dims}")
    for dim in ("pass_", "prompt", "layer", "token"):
        if dim not in ds.coords:
            problems.append(f"coordinate {dim!r} is missing")
    if "pass_" in ds.coords and len(set(map(str, ds.pass_.values))) != ds.sizes["pass_"]:
        problems.append(f"pass names are not unique: {list(map(str, ds.pass_.values))}")
    plan = [p.get("name") for p in attrs.get("pass_plan", [])]
    if plan and plan != [str(p) for p in ds.pass_.values]:
        problems.append(f"attribute pass_plan names {plan} but the pass_ coordinate has {list(ds.pass_.values)}")
    if "resid" in ds and attrs.get("store_dtype") and str(ds.resid.dtype) != attrs["store_dtype"]:
        problems.append(f"attribute store_dtype is {attrs['store_dtype']} but resid is {ds.resid.dtype}")
    fingerprint = attrs.get("content_fingerprint", {})
    recorded = fingerprint.get("pass_pairs", fingerprint.get("pairs"))  # format 1 called them pairs
    if "pair" in ds.coords and recorded is not None:
        pairs = [p[0] for p in recorded]
        if pairs != [str(p) for p in ds.pair.values]:
            problems.append(f"attribute pairs {pairs} differ from the pair coordinate {list(ds.pair.values)}")
    if "n_tokens" in ds.coords and int(ds.n_tokens.max()) > ds.sizes.get("token", 0):
        problems.append("n_tokens exceeds the token dimension")
    return problems


def _coverage(path, ds: xr.Dataset) -> list[str]:
    if "done" not in ds:
        return []
    group = zarr.open_group(store=zarr_store(path), mode="r", use_consolidated=False)
    return completeness(group).missing([str(p) for p in ds.pass_.values], MAX_LISTED)


VALUE_BLOCK_BYTES = 64 * 2**20  # of one float variable, read at once by the value checks


def _values(ds: xr.Dataset) -> list[str]:
    problems: list[str] = []
    n_tokens = ds.n_tokens.values.astype(int)
    real_pt = np.arange(ds.sizes["token"])[None, :] < n_tokens[:, None]  # (prompt, token)
    done = np.asarray(ds["done"].values, dtype=bool) if "done" in ds else None
    chunk = int(ds.resid.data.chunksize[1]) if "resid" in ds else ds.sizes["prompt"]
    chunk_token = int(ds.resid.data.chunksize[3]) if "resid" in ds else None
    # blocks of whole prompt chunks, as many as fit VALUE_BLOCK_BYTES of resid (a store of short prompts has
    # tens of thousands of chunks: a read and a Python loop per chunk took many minutes)
    per_prompt = ds.resid.nbytes // max(1, ds.sizes["prompt"]) if "resid" in ds else 1
    block = chunk * max(1, VALUE_BLOCK_BYTES // max(1, per_prompt * chunk))
    labels = ds.prompt.values
    for rows in chunk_slices(ds.sizes["prompt"], block):
        extent = token_extent(n_tokens, rows, chunk_token, ds.sizes["token"])  # chunks past it are never written
        real = real_pt[rows, :extent]
        for name, var in ds.data_vars.items():
            if var.dtype.kind != "f" or "prompt" not in var.dims:
                continue
            regions = direct_regions(var)  # a local store's chunks or shards, read without a Dask graph
            if regions is not None:
                values = regions.read(tuple(rows if d == "prompt" else slice(0, extent) if d == "token"
                                            else slice(None) for d in var.dims))
            else:
                values = var.isel(prompt=rows, **({"token": slice(0, extent)} if "token" in var.dims else {})).values
            if np.isinf(values).any():
                where = dict(zip(var.dims, np.argwhere(np.isinf(values))[0].tolist(), strict=False))
                where["prompt"] += rows.start
                problems.append(f"{name} has infinite values, e.g. at {where}")
            if name in ("resid", "final"):
                problems += _nan_layout(name, values, real, done, rows, ds.pass_.values, labels)
    return problems


def _nan_layout(name: str, values: np.ndarray, real: np.ndarray, done: np.ndarray | None, rows: slice,
                passes, labels) -> list[str]:
    """NaN exactly on padding: a NaN at a real position of a done region, or a value at a padding position."""
    problems = []
    for p in range(values.shape[0]):
        nan = np.isnan(values[p])  # (prompt, [layer,] token, dim)
        axes = tuple(a for a in range(1, nan.ndim) if a != nan.ndim - 2)
        any_nan_gt, all_nan_gt = nan.any(axis=axes), nan.all(axis=axes)
        checked = np.ones(len(real), dtype=bool) if done is None else done[p, rows]
        gaps = (any_nan_gt & real).any(axis=1) & checked
        leaks = (~all_nan_gt & ~real).any(axis=1) & checked
        for i in np.flatnonzero(gaps):
            token = int(np.argmax(any_nan_gt[i] & real[i]))
            problems.append(f"{name} pass {passes[p]} prompt {labels[rows.start + i]}: NaN at real token {token} "
                            "(a region marked done has gaps)")
        for i in np.flatnonzero(leaks):
            problems.append(f"{name} pass {passes[p]} prompt {labels[rows.start + i]}: values on padding positions "
                            "(should be NaN)")
    return problems


def _padding_chunks_written(path: Path, ds: xr.Dataset) -> list[str]:
    """Chunks of a local store that hold only padding: a sound capture never writes them."""
    import zarr

    problems = []
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    n_tokens = ds.n_tokens.values.astype(int)
    for name, var in ds.data_vars.items():
        if "prompt" not in var.dims or "token" not in var.dims or var.chunks is None:
            continue
        p_axis, t_axis = var.dims.index("prompt"), var.dims.index("token")
        real = real_blocks(n_tokens, var.chunks[p_axis][0], var.chunks[t_axis][0], var.sizes["token"])
        found = stored_chunks(path, name, group[name])
        bad = [key for key in found if len(key) == var.ndim and not real[key[p_axis], key[t_axis]]]
        if bad:
            problems.append(f"{name}: {len(bad)} chunk(s) holding only padding were written "
                            f"(e.g. {'/'.join(map(str, bad[0]))})")
    return problems


def verify_store(path: str | Path, deep: bool = False) -> list[str]:
    """Every problem found, as one line each; an empty list for a sound store. ``deep`` decodes every chunk
    of every array (checksums included), not a sample of each.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> verify_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))
    []
    """
    path = normalize(path)
    try:
        attrs = check_store(path)
    except ResdiffError as exc:
        return [str(exc)]
    consolidated = has_consolidated_metadata(path)
    ds = xr.open_zarr(str(path), **xarray_kwargs(path), consolidated=consolidated)
    if not is_url(path):  # damaged chunks first: a deleted token_id chunk would otherwise read as short lengths
        damaged = missing_chunks(path) + corrupt_chunks(path, deep)
        if damaged:  # the values of damaged chunks would be misread: report the damage alone
            return _capped(damaged)
    try:
        validate_opened(path, ds)
    except ResdiffError as exc:
        return [str(exc)]
    problems = _structure(ds, attrs)
    if not consolidated:
        problems.append("the store has no consolidated metadata (its capture was killed while it finished); rerun "
                        "the same capture command to repair it")
    if problems:
        return problems  # values cannot be checked against a broken layout
    problems = _coverage(path, ds)
    if not is_url(path):
        problems += _padding_chunks_written(path, ds)
    try:  # direct reads of a local store verify each chunk's checksum as they go
        problems += _values(ds if is_url(path) else open_store(path)) if "resid" in ds else []
    except CorruptChunk as exc:  # a damaged chunk outside the sample
        problems.append(str(exc))
    return _capped(problems)


def _capped(problems: list[str]) -> list[str]:
    if len(problems) > MAX_LISTED:
        problems = [*problems[:MAX_LISTED], f"... and {len(problems) - MAX_LISTED} more"]
    return problems
