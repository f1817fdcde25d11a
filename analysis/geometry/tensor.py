"""CP (parafac) and Tucker decompositions of the small pair x layer x dim tensor of mean differences.

tensorly has no Dask backend (handing it a Dask array tried to allocate the whole
tensor), so the tensor is reduced with Dask first (:func:`analysis.geometry.decompose.spectra`
gives ``mean_diff``), then decomposed in float64 numpy.

Rank rules when none is given:
- CP: the smallest rank R <= ``MAX_CP_RANK`` whose relative reconstruction error is at most
  ``CP_TOLERANCE`` (5%), else ``MAX_CP_RANK``;
- Tucker: per mode, the fewest singular values of the mode unfolding that keep 99% of
  its energy (truncated HOSVD rule).
"""

from __future__ import annotations

import warnings

import numpy as np
import tensorly as tl
import xarray as xr
from tensorly.decomposition import parafac, tucker

from store.errors import UsageError

MAX_CP_RANK = 8
CP_TOLERANCE = 0.05
MODES = ("pair", "layer", "dim")


def _relative_error(tensor: np.ndarray, rebuilt: np.ndarray) -> float:
    norm = np.linalg.norm(tensor)
    return float(np.linalg.norm(tensor - rebuilt) / norm) if norm > 0 else 0.0


def cp(tensor: np.ndarray, rank: int) -> tuple[np.ndarray, list[np.ndarray], float]:
    """(weights, factors, relative error) of the best of a few CP-ALS runs."""
    best = None
    for seed, init in enumerate(("svd", "random", "random")):
        with warnings.catch_warnings():  # a rank above a mode's size is fine for CP; tensorly warns anyway
            warnings.filterwarnings("ignore", "Trying to compute SVD", UserWarning)
            try:
                weights, factors = parafac(tl.tensor(tensor), rank, init=init, n_iter_max=2000, tol=1e-12,
                                           normalize_factors=True, random_state=seed)
            except np.linalg.LinAlgError:  # more components than the data has directions (e.g. equal pairs)
                continue
        error = _relative_error(tensor, tl.cp_to_tensor((weights, factors)))
        if best is None or error < best[2]:
            best = (np.asarray(weights), [np.asarray(f) for f in factors], error)
        if error < 1e-6:
            break
    return best  # None when every start was singular


def hosvd_ranks(tensor: np.ndarray, energy: float = 0.99) -> tuple[int, ...]:
    ranks = []
    for mode in range(tensor.ndim):
        s = np.linalg.svd(tl.unfold(tl.tensor(tensor), mode), compute_uv=False) ** 2
        ranks.append(int(np.searchsorted(np.cumsum(s) / max(s.sum(), 1e-300), energy - 1e-12) + 1))
    return tuple(ranks)


def _expand(factor: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """A pair factor over the pairs that moved, as one over all pairs (zero loadings for the rest)."""
    out = np.zeros((n, factor.shape[1]))
    out[rows] = factor
    return out


def _zero_decompositions(mean_diff: xr.DataArray, rank: int) -> xr.Dataset:
    shape = [mean_diff.sizes[m] for m in MODES]
    coords = {mode: mean_diff[mode].values for mode in MODES}
    data = {
        "cp_weight": (("cp_rank",), np.zeros(rank), {"long_name": "CP component weights (no pair changed)"}),
        **{f"cp_{mode}": ((mode, "cp_rank"), np.zeros((n, rank)), {"long_name": f"CP factor over {mode}"})
           for mode, n in zip(MODES, shape, strict=True)},
        "tucker_core": (("tucker_pair", "tucker_layer", "tucker_dim"), np.zeros((1, 1, 1)),
                        {"long_name": "Tucker core"}),
        **{f"tucker_{mode}": ((mode, f"tucker_{mode}"), np.zeros((n, 1)), {"long_name": f"Tucker factor over {mode}"})
           for mode, n in zip(MODES, shape, strict=True)},
    }
    return xr.Dataset(data, coords={**coords, "cp_rank": np.arange(rank)}).assign_attrs(
        cp_relative_error=0.0, tucker_relative_error=0.0, tucker_ranks=[1, 1, 1],
        cp_rank_rule="no pair changed: zero factors")


def tensor_decompositions(mean_diff: xr.DataArray, cp_rank: int | None = None,
                          tucker_ranks: tuple[int, int, int] | None = None) -> xr.Dataset:
    """CP and Tucker of ``mean_diff`` (pair, layer, dim), labelled with its coords.

    Pairs whose mean difference is exactly zero everywhere (SFT often leaves the input
    embeddings as they were, so BB-SB and BS-SS agree exactly) are left out of both
    decompositions and get zero loadings; a tensor that is zero throughout decomposes
    into zero factors with zero error.
    """
    full = np.nan_to_num(mean_diff.transpose(*MODES).values.astype(np.float64))
    if cp_rank is not None and cp_rank < 1:
        raise UsageError(f"--cp-rank must be at least 1, got {cp_rank}")
    moving = np.flatnonzero(np.abs(full).reshape(len(full), -1).max(axis=1) > 0)
    if not len(moving):
        return _zero_decompositions(mean_diff, cp_rank or 1)
    tensor = full[moving]
    if cp_rank is None:
        found = None
        for rank in range(1, MAX_CP_RANK + 1):
            attempt = cp(tensor, rank)
            if attempt is None:  # singular at this rank: the data holds fewer components; keep the last one
                break
            found = attempt
            if attempt[2] <= CP_TOLERANCE:
                break
    else:
        found = cp(tensor, cp_rank)
    if found is None:
        raise UsageError(f"CP of rank {cp_rank or 1} is singular for this store's mean differences; choose a smaller "
                         "--cp-rank")
    weights, factors, error = found
    ranks = tuple(tucker_ranks) if tucker_ranks else hosvd_ranks(tensor)
    if len(ranks) != 3 or any(r < 1 or r > n for r, n in zip(ranks, tensor.shape, strict=True)):
        raise UsageError(f"--tucker-ranks must be three ranks within the tensor's shape {tensor.shape}, got {ranks}")
    core, tucker_factors = tucker(tl.tensor(tensor), rank=list(ranks), init="svd", n_iter_max=500, tol=1e-10)
    tucker_error = _relative_error(tensor, tl.tucker_to_tensor((core, tucker_factors)))
    factors[0] = _expand(factors[0], moving, len(full))
    tucker_factors = [_expand(tucker_factors[0], moving, len(full)), *tucker_factors[1:]]
    coords = {mode: mean_diff[mode].values for mode in MODES}
    data = {
        "cp_weight": (("cp_rank",), weights, {"long_name": "CP component weights (factors have unit norm)"}),
        **{f"cp_{mode}": ((mode, "cp_rank"), f, {"long_name": f"CP factor over {mode}"})
           for mode, f in zip(MODES, factors, strict=True)},
        "tucker_core": (("tucker_pair", "tucker_layer", "tucker_dim"), np.asarray(core), {"long_name": "Tucker core"}),
        **{f"tucker_{mode}": ((mode, f"tucker_{mode}"), np.asarray(f), {"long_name": f"Tucker factor over {mode}"})
           for mode, f in zip(MODES, tucker_factors, strict=True)},
    }
    return xr.Dataset(data, coords={**coords, "cp_rank": np.arange(len(weights))}).assign_attrs(
        cp_relative_error=error, tucker_relative_error=tucker_error, tucker_ranks=list(ranks),
        cp_rank_rule="given" if cp_rank else f"smallest R <= {MAX_CP_RANK} with error <= {CP_TOLERANCE}",
    )
