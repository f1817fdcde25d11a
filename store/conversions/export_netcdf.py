"""``export-netcdf``: a selection of a store as a float32 netCDF4 file.

netCDF4 has no float16, so floating variables are written as float32 (the stack
notes record that float16 written through h5netcdf makes netCDF4 crash on open).
Booleans become int8 and nested attributes JSON strings, which netCDF cannot hold
natively. The data stream through Dask chunk by chunk; the file is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xarray as xr

from store.atomic import atomic_output
from store.completeness import LENS_VARIABLES, left_out, usable
from store.errors import MissingData, NotExportable, UsageError
from store.reader import open_store


def parse_selection(items: list[str] | None, ds: xr.Dataset) -> dict:
    """``["pass_=SS", "layer=3"]`` -> ``{"pass_": "SS", "layer": 3}`` (values typed like the coordinate)."""
    selection: dict = {}
    for item in items or []:
        dim, sep, value = item.partition("=")
        dim = dim.strip()
        if not sep or dim not in ds.dims:
            raise UsageError(f"--sel {item!r} must be DIM=VALUE with DIM one of {', '.join(map(str, ds.dims))}")
        labels = ds[dim].values if dim in ds.coords else np.arange(ds.sizes[dim])
        typed = int(value) if np.issubdtype(np.asarray(labels).dtype, np.integer) else value
        if typed not in set(labels.tolist()):
            raise UsageError(f"--sel {item!r}: {dim} has no label {value!r}")
        selection[dim] = typed
    return selection


def _netcdf_ready(ds: xr.Dataset, path: str | Path) -> xr.Dataset:
    out = ds.copy()
    for name, var in list(out.variables.items()):
        if var.dtype.kind == "f" and var.dtype != np.float64:
            out[name] = var.astype("float32")
        elif var.dtype.kind == "b":
            out[name] = var.astype("int8")
        elif var.dtype.kind in "OTU":  # labels: small, and netCDF needs them in memory to type them
            out[name] = var.load().astype(object)
            with_nul = [i for i, text in enumerate(out[name].values.ravel()) if "\x00" in str(text)]
            if with_nul:  # netCDF-C strings end at the first NUL: the text would be cut without a word
                raise NotExportable(path=path, detail=f"{len(with_nul)} {name} value(s) hold a NUL character, which "
                                    "netCDF strings cannot keep (they would be cut there); select prompts without "
                                    "them with --sel, or read the text from the store itself")
        out[name].encoding = {}
    out.attrs = {k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in ds.attrs.items()}
    return out


def export_netcdf(store: str | Path, out: str | Path, selection: list[str] | None = None,
                  variables: list[str] | None = None, log=None) -> Path:
    """Write the selected part of ``store`` to ``out`` (netCDF4, float32).

    The token axis is cut to the selection's longest prompt (padding past it is not written);
    unfinished lens statistics are left out with a line to ``log`` (refused when asked for by name).
    """
    full = open_store(store)
    if variables:
        unknown = [v for v in variables if v not in full.data_vars]
        if unknown:
            raise UsageError(f"--vars: no variable {unknown[0]!r} in the store; it has {', '.join(full.data_vars)}")
    ds, notes = usable(full, needs_residuals=not variables or "resid" in variables or "final" in variables,
                       reads_lens=not variables or any(v in LENS_VARIABLES for v in variables))
    if variables:
        dropped = [v for v in variables if v not in ds.data_vars]
        if dropped:
            raise MissingData(what=f"finished {dropped[0]}", fix=left_out(ds))
        ds = ds[variables]
    for note in notes:
        (log or print)(note)
    ds = ds.sel(parse_selection(selection, ds))
    if "token" in ds.dims and "n_tokens" in ds.coords:  # the selection's longest prompt, not the store's
        ds = ds.isel(token=slice(0, max(1, int(np.asarray(ds.n_tokens.values).max()))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as partial:
        _netcdf_ready(ds, store).to_netcdf(partial, engine="netcdf4", format="NETCDF4")
    return out
