"""The real positions of a store as rows: ``(pass_, layer, position, dim)``, padding never included.

For consumers that want rows of tokens (decompositions, training): each real position
of each prompt is one row along ``position``, with its ``prompt`` (label) and ``token``
as coordinates. Built lazily from the store's chunks: only the (prompt, token) blocks
that hold real positions are read, each once, and only their real cells are kept.
Rows come block by block (the store's layout), not prompt by prompt; sort by the
coordinates if an order matters.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from store.chunking import real_blocks
from store.errors import MissingData


def _take_real(block: np.ndarray, real_pt: np.ndarray) -> np.ndarray:
    return block[real_pt]


def real_positions(ds: xr.Dataset, name: str = "resid") -> xr.DataArray:
    """``ds[name]`` with its ``prompt`` and ``token`` axes replaced by one ``position`` axis of real positions.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> ds = open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr", lengths=(5, 3, 4)))
    >>> rows = real_positions(ds)
    >>> rows.dims, rows.sizes["position"], int(ds.n_tokens.sum())
    (('pass_', 'layer', 'position', 'dim'), 12, 12)
    """
    if name not in ds:
        raise MissingData(what=name, fix="capture with residuals (not a statistics-only store)")
    var = ds[name]
    rest = [d for d in var.dims if d not in ("prompt", "token")]
    data = var.transpose("prompt", "token", *rest).data
    if not isinstance(data, da.Array):
        data = da.from_array(data, chunks=(len(var.prompt), var.sizes["token"], *data.shape[2:]))
    n_tokens = np.asarray(ds.n_tokens.values)
    chunk_prompt, chunk_token = data.chunks[0][0], data.chunks[1][0]
    real_pt = np.arange(var.sizes["token"])[None, :] < n_tokens[:, None]
    pieces, prompts, tokens = [], [], []
    for i, j in zip(*np.nonzero(real_blocks(n_tokens, chunk_prompt, chunk_token, var.sizes["token"])), strict=True):
        rows, cols = slice(i * chunk_prompt, (i + 1) * chunk_prompt), slice(j * chunk_token, (j + 1) * chunk_token)
        mask = real_pt[rows, cols]
        where_p, where_t = np.nonzero(mask)
        piece = data.blocks[i, j].map_blocks(_take_real, mask, dtype=data.dtype, drop_axis=1,
                                             chunks=((len(where_p),), *data.chunks[2:]))
        pieces.append(piece)
        prompts.append(where_p + rows.start)
        tokens.append(where_t + cols.start)
    stacked = da.concatenate(pieces, axis=0)
    rows_p, rows_t = np.concatenate(prompts), np.concatenate(tokens)
    coords = {"prompt": ("position", ds.prompt.values[rows_p]), "token": ("position", rows_t)}
    for extra in ("token_id", "role", "token_position"):
        if extra in ds.coords and ds[extra].dims == ("prompt", "token"):
            coords[extra] = ("position", np.asarray(ds[extra].values)[rows_p, rows_t])
    for dim in rest:
        if dim in var.coords:
            coords[dim] = var[dim]
    out = xr.DataArray(stacked, dims=("position", *rest), coords=coords, name=name, attrs=var.attrs)
    return out.transpose(*("position" if d == "token" else d for d in var.dims if d != "prompt"))
