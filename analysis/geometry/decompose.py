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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xarray as xr

from analysis.compute.gram_sums import GramSums, layer_tile, pair_grams
from analysis.compute.scheduler import parallelism
from analysis.geometry.metrics import store_pass_pairs
from store.errors import StoreConflict, UsageError
from store.schema import string_array


def _spectrum(gram_dd: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(gram_dd)
    order = np.argsort(values)[::-1]
    singular = np.sqrt(np.clip(values[order], 0.0, None))
    return singular, vectors[:, order[:top_k]].T


def _slot_spectra(sums: GramSums, top_k: int) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """The spectrum of each Gram of ``sums`` by (layer offset, slot): pairs sharing a Gram share it (slot -1,
    no difference at all, has none). Computed on the worker threads (eigh releases the GIL)."""
    first = {(offset, int(slot)): q for (q, offset), slot in np.ndenumerate(sums.slot_ql) if slot >= 0}
    with ThreadPoolExecutor(parallelism()) as pool:
        spectra = pool.map(lambda key: _spectrum(sums.gram(first[key], key[0]), top_k), first)
        return dict(zip(first, spectra, strict=True))


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
            exclude_pt: np.ndarray | None = None, massive_factor: float | None = None) -> xr.Dataset:
    """Spectra, effective ranks, top directions, principal angles and mean differences per pair and layer.

    Computes every pair from one read of each pass (:mod:`analysis.compute.gram_sums`), the store's
    layers at once or, under a memory limit, a tile of them at a time (use
    :func:`analysis.compute.context.compute_on` to choose threads or a cluster). ``exclude_pt``
    (prompt x token booleans, store order) leaves positions out; ``massive_factor`` also
    the massive-activation positions at that factor (:mod:`analysis.geometry.outliers`), found while reading.
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
    passes = [str(p) for p in ds.pass_.values]
    left_q = np.array([passes.index(lefts[names.index(p)]) for p in chosen], dtype=np.int64)
    right_q = np.array([passes.index(rights[names.index(p)]) for p in chosen], dtype=np.int64)
    tile = layer_tile(ds, len(chosen))
    if massive_factor is not None and tile < n_layer:  # found from every layer: first, in a pass of their own
        from analysis.geometry.outliers import massive_positions

        massive = np.asarray(massive_positions(ds, massive_factor).massive.values)
        exclude_pt = massive if exclude_pt is None else exclude_pt | massive
        massive_factor = None
    for start in range(0, n_layer, tile):
        layers = slice(start, min(start + tile, n_layer))
        sums = pair_grams(ds, left_q, right_q, layers, exclude_pt, massive_factor)
        found = _slot_spectra(sums, top_k)
        for offset in range(layers.stop - start):
            layer = start + offset
            for q in range(len(chosen)):
                slot = int(sums.slot_ql[q, offset])
                singular[q, layer], direction[q, layer] = found[offset, slot] if slot >= 0 else \
                    (np.zeros(n_comp), np.full((top_k, n_dim), np.nan))
                if not singular[q, layer].any():  # the pair's passes agree exactly here: no directions
                    direction[q, layer] = np.nan
                mean_diff[q, layer] = sums.sum_qld[q, offset] / max(sums.count_ql[q, offset], 1)
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

    Massive-activation positions (:mod:`analysis.geometry.outliers`) are left out unless ``include_massive`` (one sink
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
    from analysis.geometry.outliers import MASSIVE_FACTOR

    exclude = None if include_massive or massive is None else np.asarray(massive, dtype=bool)
    factor = MASSIVE_FACTOR if not include_massive and massive is None else None
    result = spectra(ds, top_k=top_k, pairs=pairs, progress=progress, exclude_pt=exclude, massive_factor=factor)
    from analysis.geometry.tensor import tensor_decompositions

    tensors = tensor_decompositions(result.mean_diff, cp_rank, tucker_ranks)
    return result.merge(tensors).assign_attrs(**tensors.attrs)


def summary_lines(ds: xr.Dataset, result: xr.Dataset) -> list[str]:
    """What ``decompose`` prints: pairs exactly zero at every layer said once with what it means, pairs with the
    same spectrum at every layer (the same differences up to sign) collapsed into one table, then each distinct
    pair's participation ratio and ranks per layer."""
    from analysis.report.tables import table
    from analysis.report.text import why_identical

    ratio = result.participation_ratio.values  # (pair, layer); NaN where the differences are all zero
    pairs = [str(q) for q in result.pair.values]
    zero = [q for q, row in zip(pairs, ratio, strict=True) if not np.isfinite(row).any()]
    lines = []
    if zero:
        lines.append(f"pairs {', '.join(zero)}: no difference at any layer (exactly 0: {why_identical(ds, zero)}), "
                     "so no spectrum")
    groups: list[list[str]] = []
    for q in (q for q in pairs if q not in zero):
        same = next((g for g in groups if all(np.array_equal(result[v].sel(pair=g[0]).values,
                                                              result[v].sel(pair=q).values, equal_nan=True)
                                               for v in ("singular_value", "direction"))), None)
        if same is None:
            groups.append([q])
        else:
            same.append(q)
    for group in (g for g in groups if len(g) > 1):
        lines.append(f"pairs {', '.join(group)}: the same spectrum and directions at every layer (the same "
                     "differences up to sign), shown once")
    rows = [[" = ".join(group), int(la), float(ratio[pairs.index(group[0]), j]), int(rank90), int(rank99)]
            for group in groups
            for j, (la, rank90, rank99) in enumerate(zip(result.layer.values, result.rank90.sel(pair=group[0]).values,
                                                         result.rank99.sel(pair=group[0]).values, strict=True))]
    rows = [[*row[:2], row[2] if np.isfinite(row[2]) else "- (no difference)", *row[3:]] for row in rows]
    lines.append(table(["pair", "layer", "participation", "rank90", "rank99"], rows))
    return lines


def default_output(store: str | Path, key: str) -> Path:
    """``NAME.decomp-KEY.zarr`` beside the store (under ``outputs/`` for a store at a URL)."""
    from store.location import local_sibling

    return local_sibling(store, f".decomp-{key}.zarr")


def decompose_store(store: str | Path, top_k: int = 8, cp_rank: int | None = None,
                    tucker_ranks: tuple[int, int, int] | None = None, pairs: list[str] | None = None,
                    out: str | Path | None = None, force: bool = False, progress: bool = False,
                    include_massive: bool = False, massive: np.ndarray | None = None) -> tuple[Path, bool]:
    """Decompose a store and write the labelled results as a sibling Zarr store; (path, reused).

    Massive-activation positions (``analysis.geometry.outliers``) are left out unless ``include_massive``:
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
    from store.target import WriteMode, claim
    from store.writer import consolidate

    ds = open_store(store)
    settings = {"top_k": top_k, "cp_rank": cp_rank, "tucker_ranks": list(tucker_ranks) if tucker_ranks else None,
                "pairs": pairs, "include_massive": include_massive}
    key = settings_key(ds, settings)
    path = Path(out) if out else default_output(store, key)
    if claim(path, WriteMode.OVERWRITE if force else WriteMode.RESUME, resdiff=False, flag="--out") == "existing":
        if xr.open_zarr(str(path)).attrs.get("settings_key") == key:
            return path, True
        raise StoreConflict(f"{path} holds a decomposition with other settings or of another store; "
                            "pass --overwrite to replace it, or another --out")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ds.sizes["layer"], desc="decompose", unit="layer")
    result = decompose(ds, top_k, cp_rank, tucker_ranks, pairs, include_massive, massive,
                       progress=bar.update if bar else None)
    if bar:
        bar.close()
    result = result.assign_attrs(settings_key=key, settings=json.dumps(settings), source_store=str(store))
    with atomic_output(path) as tmp:
        result.to_zarr(str(tmp), mode="w-", consolidated=False)
        consolidate(tmp)  # a plain xr.open_zarr(path) then opens fast and silently
    return path, False
