"""The fused residual sums against plain float64 numpy, for float16 (bit-exact widening) and float32."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import open_store, pair_metrics
from analysis.compute.dim_sums import residual_sums
from analysis.geometry.metrics import store_pass_pairs
from store.testing import write_tiny_store

LEFT, RIGHT = np.array([0, 0, 0, 1, 1, 2]), np.array([1, 2, 3, 2, 3, 3])


def _reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.concatenate([(x * x).sum(-1), (x[LEFT] * x[RIGHT]).sum(-1), ((x[RIGHT] - x[LEFT]) ** 2).sum(-1)])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sums_match_float64(dtype):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 7, 37)) * 30).astype(dtype)
    x[0, 0, 1, 2, 3] = np.nan  # padding poisons only its own position
    got = residual_sums(list(x), LEFT, RIGHT)
    want = _reference(x)
    assert got.shape == (16, 3, 5, 7)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    squares, dots, diffs = got[:4], got[4:10], got[10:]
    np.testing.assert_allclose(squares, want[:4], rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(diffs, want[10:], rtol=1e-12, equal_nan=True)
    # the dot products are derived from the other sums: rounded as a sum, to eps x (|a|^2 + |b|^2)
    scale = squares[LEFT] + squares[RIGHT]
    assert (np.abs(dots - want[4:10]) <= 1e-14 * scale)[~np.isnan(scale)].all()
    assert not np.allclose(dots, 0.5 * scale, equal_nan=True)  # not the norms alone


def test_every_float16_value_widens_exactly():
    bits = np.arange(65536, dtype=np.uint16).view(np.float16)
    finite = bits[np.isfinite(bits)]
    x = np.stack([finite, np.ones_like(finite)])[:, :, None]  # one dim: sum h^2 is h^2
    got = residual_sums(list(x), np.array([0]), np.array([1]))
    np.testing.assert_array_equal(got[0], finite.astype(np.float64) ** 2)  # subnormals and zeros included
    special = np.array([np.inf, -np.inf, np.nan], dtype=np.float16)[:, None]
    sums = residual_sums([special, special], np.array([0]), np.array([1]))
    assert np.isposinf(sums[0, :2]).all() and np.isnan(sums[0, 2])


def test_identical_passes_differ_by_exactly_zero():
    x = np.random.default_rng(1).standard_normal((2, 6, 64)).astype(np.float16)
    sums = residual_sums([x[0], x[0]], np.array([0]), np.array([1]))
    assert (sums[3] == 0).all() and (sums[2] == sums[0]).all()  # summed directly, never ||a||^2 + ||b||^2 - 2ab


def test_residual_only_store_gets_all_pairs_of_its_passes(tmp_path):
    ds = open_store(write_tiny_store(tmp_path / "s.zarr", store_dtype="float16"))
    assert "pair" not in ds.dims
    names, _left, _right = store_pass_pairs(ds)
    assert names == ["BB-BS", "BB-SB", "BB-SS", "BS-SB", "BS-SS", "SB-SS"]
    got = pair_metrics(ds).norm_diff.sel(pair="BS-SS").values
    resid = ds.resid.values.astype(np.float64)
    want = np.linalg.norm(resid[3] - resid[1], axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_kept_sums_match_float64_and_their_norms_are_the_metrics(dtype):
    """Masked sums against plain float64; the sums of squares they give on the way are bit-identical to
    residual_sums' (so a massive position found while summing is the one massive_positions finds)."""
    from analysis.compute.dim_sums import kept_sums

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 4, 6, 37)) * 30).astype(dtype)  # (prompt, layer, token, dim)
    x[2, :, 4:] = np.nan  # a shorter prompt's padding
    keep = rng.random((2, 3, 6)) > 0.4
    keep[:, 2, 4:] = False
    layers = np.array([3, 1])
    sums, squares = kept_sums(x, keep, layers, sumsq=True)
    want = np.einsum("mpt,pltd->mld", keep.astype(np.float64), np.nan_to_num(x[:, layers].astype(np.float64)))
    np.testing.assert_allclose(sums, want, rtol=1e-12)
    none = np.zeros(0, dtype=np.int64)
    np.testing.assert_array_equal(squares, residual_sums([x], none, none)[0])
