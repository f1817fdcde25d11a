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

from store.chunking import TARGET_CHUNK_BYTES, real_blocks
from store.errors import MissingData


def _take_real(block: np.ndarray, real_pt: np.ndarray) -> np.ndarray:
    return block[real_pt]


def has_padding_chunks(ds: xr.Dataset, name: str = "resid") -> bool:
    """True when some (prompt, token) chunks of ``ds[name]`` hold only padding (a ragged store)."""
    var = ds[name]
    if var.chunks is None or "token" not in var.dims:
        return False
    chunks = dict(zip(var.dims, var.chunks, strict=True))
    return not real_blocks(np.asarray(ds.n_tokens.values), chunks["prompt"][0], chunks["token"][0],
                           var.sizes["token"]).all()


def rows_per_chunk(var: xr.DataArray, target_bytes: int = TARGET_CHUNK_BYTES) -> int:
    """Positions per chunk of a row view so that one chunk of one pass is about a store chunk's size."""
    chunks = dict(zip(var.dims, var.chunks, strict=True))
    per_position = var.dtype.itemsize * int(np.prod([chunks[d][0] for d in var.dims
                                                     if d not in ("prompt", "token", "pass_", "pair")]))
    return max(1, target_bytes // max(per_position, 1))


def real_positions(ds: xr.Dataset, name: str = "resid", rows: int | None = None) -> xr.DataArray:
    """``ds[name]`` with its ``prompt`` and ``token`` axes replaced by one ``position`` axis of real positions.

    ``rows`` regroups the positions into chunks of that many (fewer, larger tasks downstream).

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
        in_p, in_t = slice(i * chunk_prompt, (i + 1) * chunk_prompt), slice(j * chunk_token, (j + 1) * chunk_token)
        mask = real_pt[in_p, in_t]
        where_p, where_t = np.nonzero(mask)
        piece = data.blocks[i, j].map_blocks(_take_real, mask, dtype=data.dtype, drop_axis=1,
                                             chunks=((len(where_p),), *data.chunks[2:]))
        pieces.append(piece)
        prompts.append(where_p + in_p.start)
        tokens.append(where_t + in_t.start)
    stacked = da.concatenate(pieces, axis=0)
    if rows is not None:
        stacked = stacked.rechunk({0: rows})
    rows_p, rows_t = np.concatenate(prompts), np.concatenate(tokens)
    coords = {"prompt": ("position", ds.prompt.values[rows_p]), "token": ("position", rows_t)}
    for extra in ("token_id", "role", "token_position"):
        if extra in ds.coords and ds[extra].dims == ("prompt", "token"):
            labels = ds[extra].data  # lazy where the store's are: point-wise picks, computed when asked
            picked = labels.vindex[rows_p, rows_t] if isinstance(labels, da.Array) else labels[rows_p, rows_t]
            coords[extra] = ("position", picked)
    for dim in rest:
        if dim in var.coords:
            coords[dim] = var[dim]
    out = xr.DataArray(stacked, dims=("position", *rest), coords=coords, name=name, attrs=var.attrs)
    return out.transpose(*("position" if d == "token" else d for d in var.dims if d != "prompt"))
