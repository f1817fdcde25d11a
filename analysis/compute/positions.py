"""The real positions of a store as rows: ``(pass_, layer, position, dim)``, padding never included.

For consumers that want rows of tokens (decompositions, training): each real position
of each prompt is one row along ``position``, with its ``prompt`` (label) and ``token``
as coordinates. Built lazily, a task per run of prompt chunks (``analysis.compute.regions``):
only the regions that hold real positions are read, each once, and only their real
cells are kept. Rows come prompt by prompt in store order (longest first), tokens in
order; sort by the coordinates if another order matters.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from analysis.compute.regions import materialize, prompt_runs, region, region_graph
from store.chunking import real_blocks
from store.errors import MissingData


def _rows_of(regions: list, masks: list[np.ndarray], p_axis: int, t_axis: int, shape: tuple, dtype) -> np.ndarray:
    # Each region in the variable's own axis order; its real cells become rows (position, *other axes).
    picked = [np.moveaxis(materialize(r), (p_axis, t_axis), (0, 1))[mask] for r, mask in zip(regions, masks,
                                                                                           strict=True)]
    if not picked:  # a run of prompts without a real position (possible in a selection, never in a capture)
        return np.empty((0, *shape), dtype)
    return picked[0] if len(picked) == 1 else np.concatenate(picked, axis=0)


def cut_padding_tokens(values_t: np.ndarray) -> np.ndarray:
    """``values_t`` (..., token) without the trailing tokens that are NaN everywhere in it (at least one kept).

    A block of short prompts of a ragged store then costs its real tokens, not the longest prompt's.

    >>> cut_padding_tokens(np.array([[1.0, np.nan, np.nan], [2.0, 3.0, np.nan]])).shape
    (2, 2)
    """
    real_t = ~np.isnan(values_t).reshape(-1, values_t.shape[-1]).all(axis=0)
    keep = len(real_t) - int(np.argmax(real_t[::-1])) if real_t.any() else min(1, len(real_t))
    return values_t[..., :keep]


def has_padding_chunks(ds: xr.Dataset, name: str = "resid") -> bool:
    """True when some (prompt, token) chunks of ``ds[name]`` hold only padding (a ragged store)."""
    var = ds[name]
    if var.chunks is None or "token" not in var.dims:
        return False
    chunks = dict(zip(var.dims, var.chunks, strict=True))
    return not real_blocks(np.asarray(ds.n_tokens.values), chunks["prompt"][0], chunks["token"][0],
                           var.sizes["token"]).all()


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
    if not isinstance(var.data, da.Array):
        var = var.chunk({d: -1 for d in var.dims})
    rest = [d for d in var.dims if d not in ("prompt", "token")]
    p_axis, t_axis = var.dims.index("prompt"), var.dims.index("token")
    data: da.Array = var.data
    n_tokens = np.asarray(ds.n_tokens.values)
    real_pt = np.arange(var.sizes["token"])[None, :] < n_tokens[:, None]
    runs = prompt_runs(n_tokens, data.chunks[p_axis][0], data.chunks[t_axis][0], var.sizes["token"], 1, rows)
    rest_axes = [a for a in range(data.ndim) if a not in (p_axis, t_axis)]
    rest_bounds = [np.cumsum((0, *data.chunks[a])) for a in rest_axes]
    layer = "real-positions-" + tokenize(data.name, n_tokens, rows, var.dims)
    graph, sizes, picks = {}, [], []
    for r, run in enumerate(runs):
        held = [(rows_c, extent) for rows_c, extent in zip(run.chunk_rows, run.extents, strict=True) if extent]
        masks = [real_pt[rows_c, :extent] for rows_c, extent in held]
        sizes.append(sum(int(m.sum()) for m in masks))
        for m, (rows_c, _) in zip(masks, held, strict=True):
            where_p, where_t = np.nonzero(m)
            picks.append(np.stack([where_p + rows_c.start, where_t]))
        for rest_index in np.ndindex(*(data.numblocks[a] for a in rest_axes)):
            other = {var.dims[a]: slice(int(b[i]), int(b[i + 1]))
                     for a, b, i in zip(rest_axes, rest_bounds, rest_index, strict=True)}
            regions = [region(var, {"prompt": rows_c, "token": slice(0, extent), **other}) for rows_c, extent in held]
            shape = tuple(other[var.dims[a]].stop - other[var.dims[a]].start for a in rest_axes)
            graph[(layer, r, *rest_index)] = (_rows_of, regions, masks, p_axis, t_axis, shape, data.dtype)
    chunks = (tuple(sizes), *(data.chunks[a] for a in rest_axes))
    stacked = da.Array(region_graph(layer, graph, var), layer, chunks,
                       dtype=data.dtype, meta=np.empty((0,) * len(chunks), data.dtype))
    rows_p, rows_t = np.concatenate(picks, axis=1)
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
