"""Dimension-collapse decompositions of the pairwise differences, out of core.

Per pair and layer, the difference vectors ``h_right - h_left`` of every real position
(padding excluded) form an ``N x dim`` matrix. Its spectrum comes from the ``dim x dim``
Gram matrix, accumulated with Dask one layer tile at a time (never the full array), then
``eigh``. The spectrum is of the uncentred differences: a shift shared by all positions
is a direction like any other.

- ``singular_value`` (pair, layer, component): sqrt of the Gram eigenvalues, descending;
- ``participation_ratio`` (sum s^2)^2 / sum s^4, and ``rank90`` / ``rank99``, the fewest
  components that reach 90% / 99% of sum s^2;
- ``direction`` (pair, layer, k, dim): the top-k right singular vectors;
- ``principal_angle`` (pair, pair_b, layer, k): angles in degrees between two pairs'
  top-k subspaces (0: the same subspace);
- ``mean_diff`` (pair, layer, dim): the mean difference vector, and a tensorly CP
  (``cp_pair``, ``cp_layer``, ``cp_dim``, ``cp_weight``) and Tucker decomposition of that
  pair x layer x dim tensor with their relative reconstruction errors.

Axes legend: q = pair, l = layer, n = position, d = dim, k = component.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from analysis.metrics import store_pass_pairs
from analysis.positions import has_padding_chunks, real_positions, rows_per_chunk
from store.errors import UsageError
from store.reader import is_padding_block
from store.schema import string_array


def _gram_block(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    # (prompt, layer, token, dim) x 2 -> (1, layer, dim, dim + 2): Gram, sum of rows, count of real rows.
    # One layer at a time keeps the float64 difference small; the Gram is a BLAS product.
    n_layer, n_dim = left.shape[1], left.shape[3]
    out = np.zeros((1, n_layer, n_dim, n_dim + 2))
    if is_padding_block(left) and is_padding_block(right):
        return out
    for layer in range(n_layer):
        diff_nd = (right[:, layer].astype(np.float64) - left[:, layer]).reshape(-1, n_dim)
        real = ~np.isnan(diff_nd).any(axis=1)
        diff_nd = diff_nd[real]
        out[0, layer, :, :n_dim] = diff_nd.T @ diff_nd
        out[0, layer, :, n_dim] = diff_nd.sum(axis=0)
        out[0, layer, :, n_dim + 1] = real.sum()
    return out


def _layer_sums(ds: xr.Dataset, left: str, right: str, layers: slice, exclude_pt: np.ndarray | None = None
                ) -> np.ndarray:
    """Gram, row sums and counts per layer of ``layers``, accumulated block by block in place.

    A few prompt blocks (one per worker thread) are computed at a time and added into one
    float64 accumulator, so memory holds the accumulator plus those blocks, never a tree
    of Gram-sized partial sums. ``exclude_pt`` (prompt x token, store order) leaves positions out.
    """
    sub = ds.isel(layer=layers)
    if has_padding_chunks(sub):
        # A ragged store: its real rows, regrouped into blocks about a store chunk's size (only the chunks
        # that hold real positions are read), as (position, layer, token = 1, dim) for the same block function.
        rows = real_positions(sub, rows=rows_per_chunk(sub.resid)).transpose("pass_", "position", "layer", "dim")
        if exclude_pt is not None:
            row_of = {label: i for i, label in enumerate(ds.prompt.values)}
            out = exclude_pt[[row_of[p] for p in rows.prompt.values], rows.token.values]
            rows = rows.isel(position=np.flatnonzero(~out))
        a, b = (rows.sel(pass_=p).data[:, :, None, :].rechunk({1: -1, 3: -1}) for p in (left, right))
    else:
        resid = sub.resid
        if exclude_pt is not None:  # excluded rows become NaN, which the block function leaves out
            resid = resid.where(xr.DataArray(~exclude_pt, dims=("prompt", "token")))
        # (prompt chunk, token chunk) blocks of all the tile's layers: a block's size is the store chunks'.
        a, b = (resid.sel(pass_=p).data.rechunk({1: -1, 3: -1}) for p in (left, right))
    n_layer, n_dim = a.shape[1], a.shape[3]
    blocks = [dask.delayed(_gram_block)(a.blocks[i, 0, j, 0], b.blocks[i, 0, j, 0])
              for i in range(a.numblocks[0]) for j in range(a.numblocks[2])]
    total = np.zeros((n_layer, n_dim, n_dim + 2))
    step = _blocks_at_once(total.nbytes, a.dtype.itemsize * int(np.prod(a.chunksize)))
    for start in range(0, len(blocks), step):
        for part in dask.compute(*blocks[start:start + step]):
            total += part[0]
    return total


def _blocks_at_once(gram_bytes: int, chunk_bytes: int) -> int:
    """Prompt blocks computed together: one per worker thread, fewer under a memory limit."""
    from analysis.compute import memory_limit, parallelism, release_freed_memory_early

    step, limit = parallelism(), memory_limit()
    if limit is None:
        return step
    # Gram-sized buffers go straight back to the OS; chunk-sized ones are reused from the heap.
    release_freed_memory_early(mmap_threshold=min(gram_bytes, 32 * 2**20))
    # Both passes' chunks, the block's Gram and its copies on the way out of the task (measured: about 4 Grams).
    per_block = 2 * chunk_bytes + 4 * gram_bytes
    fits = (limit - gram_bytes) // per_block
    if fits < 1:
        raise UsageError(f"--memory-limit {limit / 1e6:.0f} MB is too small to decompose this store: one block "
                         f"needs about {(gram_bytes + per_block) / 1e6:.0f} MB (layer tile x dim x dim Gram "
                         "matrices in float64); raise the limit")
    return max(1, min(step, fits))


def _layer_tile(ds: xr.Dataset) -> int:
    """Layers per computation: the store's layer chunk, fewer under a memory limit so that a block (its Gram
    matrices and both passes' chunks, :func:`_blocks_at_once`) and the accumulator fit."""
    from analysis.compute import memory_limit

    chunk = ds.resid.data.chunksize if hasattr(ds.resid.data, "chunksize") else ds.resid.shape
    tile = chunk[2]  # (pass_, prompt, layer, token, dim)
    limit = memory_limit()
    if limit is None:
        return tile
    gram = ds.sizes["dim"] * (ds.sizes["dim"] + 2) * 8  # per layer
    block = int(np.prod(chunk[1:], dtype=np.int64)) // chunk[2] * ds.resid.dtype.itemsize  # per layer, one pass
    # Half the limit by the model: measured, a one-block tile of 15 layers (model 500 MB) took 605 MB.
    return max(1, min(tile, limit // (2 * (5 * gram + 2 * block))))


def _spectrum(gram_dd: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(gram_dd)
    order = np.argsort(values)[::-1]
    singular = np.sqrt(np.clip(values[order], 0.0, None))
    return singular, vectors[:, order[:top_k]].T


def _ranks(singular_k: np.ndarray) -> tuple[float, int, int]:
    power = singular_k**2
    total = power.sum()
    if total <= 0:
        return float("nan"), 0, 0
    share = np.cumsum(power) / total
    ratio = float(total**2 / (power**2).sum())
    return ratio, int(np.searchsorted(share, 0.9 - 1e-12) + 1), int(np.searchsorted(share, 0.99 - 1e-12) + 1)


def principal_angles(a_kd: np.ndarray, b_kd: np.ndarray) -> np.ndarray:
    """Angles (degrees, ascending) between the row spaces of two orthonormal bases; NaN where either pair
    did not change at all (a zero spectrum has no directions)."""
    if not (np.isfinite(a_kd).all() and np.isfinite(b_kd).all()):
        return np.full(min(len(a_kd), len(b_kd)), np.nan)
    cosines = np.linalg.svd(a_kd @ b_kd.T, compute_uv=False)
    return np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))


def settings_key(ds: xr.Dataset, settings: dict) -> str:
    """A short hash of the settings and the source store's identity: same key, same result."""
    source = {k: ds.attrs.get(k) for k in ("completed_at", "created_at", "pair_label")}
    text = json.dumps({"settings": settings, "source": source, "sizes": dict(ds.sizes)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def spectra(ds: xr.Dataset, top_k: int = 8, pairs: list[str] | None = None, progress=None,
            exclude_pt: np.ndarray | None = None) -> xr.Dataset:
    """Spectra, effective ranks, top directions, principal angles and mean differences per pair and layer.

    Computes one layer tile of the store at a time (use :func:`analysis.compute.compute_on`
    to choose threads or a cluster). ``exclude_pt`` (prompt x token booleans, store order;
    e.g. massive-activation positions) leaves positions out.
    """
    if "resid" not in ds:
        raise UsageError("decompositions need residuals; this store is statistics-only (from import-json)")
    names, lefts, rights = store_pass_pairs(ds)
    chosen = pairs or names
    unknown = [p for p in chosen if p not in names]
    if unknown:
        raise UsageError(f"unknown pair {unknown[0]!r}; the store has {', '.join(names)}")
    n_layer, n_dim = ds.sizes["layer"], ds.sizes["dim"]
    top_k = max(1, min(top_k, n_dim))
    n_comp = n_dim
    singular = np.full((len(chosen), n_layer, n_comp), np.nan)
    direction = np.full((len(chosen), n_layer, top_k, n_dim), np.nan)
    mean_diff = np.full((len(chosen), n_layer, n_dim), np.nan)
    ranks = np.full((3, len(chosen), n_layer), np.nan)
    tile = _layer_tile(ds)
    for start in range(0, n_layer, tile):
        layers = slice(start, min(start + tile, n_layer))
        # One pair per computation: its Gram matrices are the largest objects alive (reads repeat, FLOPs do not).
        for q, pair in enumerate(chosen):
            sums_lde = _layer_sums(ds, lefts[names.index(pair)], rights[names.index(pair)], layers, exclude_pt)
            for offset, gram_de in enumerate(sums_lde):
                layer = start + offset
                count = gram_de[0, -1]
                singular[q, layer], direction[q, layer] = _spectrum(gram_de[:, :n_dim], top_k)
                if not singular[q, layer].any():  # the pair's passes agree exactly here: no directions
                    direction[q, layer] = np.nan
                mean_diff[q, layer] = gram_de[:, n_dim] / max(count, 1)
                ranks[:, q, layer] = _ranks(singular[q, layer])
        if progress:
            progress(layers.stop - layers.start)
    angles = np.full((len(chosen), len(chosen), n_layer, top_k), np.nan)
    for a in range(len(chosen)):
        for b in range(len(chosen)):
            for layer in range(n_layer):
                angles[a, b, layer] = principal_angles(direction[a, layer], direction[b, layer])
    layer = ds.layer.values
    return xr.Dataset(
        {
            "singular_value": (("pair", "layer", "component"), singular,
                               {"long_name": "singular values of the difference vectors (uncentred)"}),
            "participation_ratio": (("pair", "layer"), ranks[0], {"long_name": "(sum s^2)^2 / sum s^4"}),
            "rank90": (("pair", "layer"), ranks[1], {"long_name": "components reaching 90% of sum s^2"}),
            "rank99": (("pair", "layer"), ranks[2], {"long_name": "components reaching 99% of sum s^2"}),
            "direction": (("pair", "layer", "k", "dim"), direction, {"long_name": "top-k principal directions"}),
            "principal_angle": (("pair", "pair_b", "layer", "k"), angles,
                                {"long_name": "principal angles between top-k subspaces", "units": "degrees"}),
            "mean_diff": (("pair", "layer", "dim"), mean_diff,
                          {"long_name": "mean of h_right - h_left over real positions"}),
        },
        coords={"pair": string_array(chosen), "pair_b": string_array(chosen), "layer": layer,
                "component": np.arange(n_comp), "k": np.arange(top_k), "dim": np.arange(n_dim)},
    )


def decompose(ds: xr.Dataset, top_k: int = 8, cp_rank: int | None = None,
              tucker_ranks: tuple[int, int, int] | None = None, pairs: list[str] | None = None,
              include_massive: bool = False, massive: np.ndarray | None = None, progress=None) -> xr.Dataset:
    """The decompositions of each pass pair's differences per layer (what ``cli.py decompose`` stores): the
    :func:`spectra` (singular values, effective ranks, top directions, principal angles, mean differences) and
    CP and Tucker decompositions of the (pair, layer, dim) mean differences. Computes, one layer tile at a time.

    Massive-activation positions (:mod:`analysis.outliers`) are left out unless ``include_massive`` (one sink
    position would otherwise be the whole spectrum); ``massive`` (prompt x token booleans, store order) gives
    them when already found. ``progress`` is called with the number of layers done after each tile.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import decompose, open_store
    >>> result = decompose(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")), top_k=2, cp_rank=1)
    >>> result.participation_ratio.dims, result.sizes["pair"], result.sizes["k"]
    (('pair', 'layer'), 6, 2)
    """
    exclude = None
    if not include_massive:
        if massive is None:
            from analysis.outliers import massive_positions

            massive = massive_positions(ds).massive.values
        exclude = np.asarray(massive) if np.asarray(massive).any() else None
    result = spectra(ds, top_k=top_k, pairs=pairs, progress=progress, exclude_pt=exclude)
    from analysis.tensor import tensor_decompositions

    tensors = tensor_decompositions(result.mean_diff, cp_rank, tucker_ranks)
    return result.merge(tensors).assign_attrs(**tensors.attrs)


def default_output(store: str | Path, key: str) -> Path:
    """``NAME.decomp-KEY.zarr`` beside the store (under ``outputs/`` for a store at a URL)."""
    from store.location import local_sibling

    return local_sibling(store, f".decomp-{key}.zarr")


def decompose_store(store: str | Path, top_k: int = 8, cp_rank: int | None = None,
                    tucker_ranks: tuple[int, int, int] | None = None, pairs: list[str] | None = None,
                    out: str | Path | None = None, force: bool = False, progress: bool = False,
                    include_massive: bool = False, massive: np.ndarray | None = None) -> tuple[Path, bool]:
    """Decompose a store and write the labelled results as a sibling Zarr store; (path, reused).

    Massive-activation positions (``analysis.outliers``) are left out unless ``include_massive``:
    one sink position would otherwise be the whole spectrum. ``massive`` (prompt x token, store
    order) gives them when the caller has already found them.

    The output is named by a hash of the settings and the source store, so rerunning
    with the same settings reuses it (unless ``force``); it is written to a temporary
    name and renamed, so an interrupted run leaves nothing half-written.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> path, reused = decompose_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"), top_k=2, cp_rank=1)
    >>> xr.open_zarr(path).rank99.dims, reused
    (('pair', 'layer'), False)
    """
    from store.atomic import atomic_output
    from store.reader import open_store
    from store.writer import check_replaceable, consolidate

    ds = open_store(store)
    settings = {"top_k": top_k, "cp_rank": cp_rank, "tucker_ranks": list(tucker_ranks) if tucker_ranks else None,
                "pairs": pairs, "include_massive": include_massive}
    key = settings_key(ds, settings)
    path = Path(out) if out else default_output(store, key)
    if path.exists() and not force:
        existing = xr.open_zarr(str(path))
        if existing.attrs.get("settings_key") == key:
            return path, True
        raise UsageError(f"{path} holds a decomposition with other settings or of another store; "
                         "pass --force to replace it, or another --out")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ds.sizes["layer"], desc="decompose", unit="layer")
    result = decompose(ds, top_k, cp_rank, tucker_ranks, pairs, include_massive, massive,
                       progress=bar.update if bar else None)
    if bar:
        bar.close()
    result = result.assign_attrs(settings_key=key, settings=json.dumps(settings), source_store=str(store))
    check_replaceable(path)
    with atomic_output(path) as tmp:
        result.to_zarr(str(tmp), mode="w-", consolidated=False)
        consolidate(tmp)  # a plain xr.open_zarr(path) then opens fast and silently
    return path, False
