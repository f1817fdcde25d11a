"""CP (parafac) and Tucker decompositions of the small pair x layer x dim tensor of mean differences.

tensorly has no Dask backend (handing it a Dask array tried to allocate the whole
tensor), so the tensor is reduced with Dask first (:func:`analysis.decompose.spectra`
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
            weights, factors = parafac(tl.tensor(tensor), rank, init=init, n_iter_max=2000, tol=1e-12,
                                       normalize_factors=True, random_state=seed)
        error = _relative_error(tensor, tl.cp_to_tensor((weights, factors)))
        if best is None or error < best[2]:
            best = (np.asarray(weights), [np.asarray(f) for f in factors], error)
        if error < 1e-6:
            break
    return best


def hosvd_ranks(tensor: np.ndarray, energy: float = 0.99) -> tuple[int, ...]:
    ranks = []
    for mode in range(tensor.ndim):
        s = np.linalg.svd(tl.unfold(tl.tensor(tensor), mode), compute_uv=False) ** 2
        ranks.append(int(np.searchsorted(np.cumsum(s) / max(s.sum(), 1e-300), energy - 1e-12) + 1))
    return tuple(ranks)


def tensor_decompositions(mean_diff: xr.DataArray, cp_rank: int | None = None,
                          tucker_ranks: tuple[int, int, int] | None = None) -> xr.Dataset:
    """CP and Tucker of ``mean_diff`` (pair, layer, dim), labelled with its coords."""
    tensor = np.nan_to_num(mean_diff.transpose(*MODES).values.astype(np.float64))
    if cp_rank is not None and cp_rank < 1:
        raise UsageError(f"--cp-rank must be at least 1, got {cp_rank}")
    if cp_rank is None:
        for rank in range(1, MAX_CP_RANK + 1):
            weights, factors, error = cp(tensor, rank)
            if error <= CP_TOLERANCE:
                break
    else:
        weights, factors, error = cp(tensor, cp_rank)
    ranks = tuple(tucker_ranks) if tucker_ranks else hosvd_ranks(tensor)
    if len(ranks) != 3 or any(r < 1 or r > n for r, n in zip(ranks, tensor.shape, strict=True)):
        raise UsageError(f"--tucker-ranks must be three ranks within the tensor's shape {tensor.shape}, got {ranks}")
    core, tucker_factors = tucker(tl.tensor(tensor), rank=list(ranks), init="svd", n_iter_max=500, tol=1e-10)
    tucker_error = _relative_error(tensor, tl.tucker_to_tensor((core, tucker_factors)))
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
