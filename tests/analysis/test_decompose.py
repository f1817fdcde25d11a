"""Decompositions on synthetic stores with planted structure, against plain numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analysis import open_store
from analysis.decompose import decompose_store, principal_angles
from store.chunking import Chunking
from store.errors import UsageError
from store.testing import tiny_template
from store.writer import StoreWriter

RANK = {"BB-BS": 2, "BB-SB": 2, "BB-SS": 2, "BS-SB": 4, "BS-SS": 2, "SB-SS": 4}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """BS and SS move along a 2-d subspace C1, SB along an orthogonal 2-d subspace C2, with per-layer scales:
    pair differences have rank 2 or 4 and their mean over positions is a CP-rank-4 tensor."""
    rng = np.random.default_rng(0)
    n_prompts, n_layers1, dim, lengths = 6, 4, 16, (7, 3, 6, 7, 2, 5)
    template = tiny_template(n_prompts=n_prompts, n_layers1=n_layers1, hidden=dim, lengths=lengths,
                             chunking=Chunking(prompt=2, layer=2))
    basis = np.linalg.qr(rng.standard_normal((dim, 4)))[0].T  # 4 orthonormal rows: C1 = 0, 1; C2 = 2, 3
    scale_lr = rng.uniform(0.5, 2.0, (n_layers1, 4))
    n_tok = template.sizes["token"]
    common = rng.standard_normal((n_prompts, n_layers1, n_tok, dim))
    comps = {"BB": [], "BS": [0, 1], "SB": [2, 3], "SS": [0, 1]}
    path = tmp_path_factory.mktemp("planted") / "s.zarr"
    writer = StoreWriter.create(path, template)
    for p, name in enumerate(template.pass_.values):
        z = np.zeros((n_prompts, n_tok, 4))
        z[..., comps[name]] = rng.standard_normal((n_prompts, n_tok, len(comps[name]))) + 1.0
        resid = common + np.einsum("ptr,lr,rd->pltd", z, scale_lr, basis)
        for i, n in enumerate(lengths):
            resid[i, :, n:] = np.nan
        writer.write_region(p, slice(0, n_prompts), resid, resid[:, -1])
    writer.finalize({})
    return path


def test_spectra_match_numpy_and_planted_ranks(planted, tmp_path):
    out, reused = decompose_store(planted, top_k=2, cp_rank=4, out=tmp_path / "d.zarr")
    res, ds = xr.open_zarr(out).load(), open_store(planted)
    resid = ds.resid.values.astype(np.float64)
    passes = list(ds.pass_.values)
    for pair in res.pair.values:
        left, right = pair.split("-")
        for layer in range(ds.sizes["layer"]):
            rows = [resid[passes.index(right), p, layer, t] - resid[passes.index(left), p, layer, t]
                    for p, n in enumerate(ds.n_tokens.values) for t in range(int(n))]
            want = np.linalg.svd(np.array(rows), compute_uv=False)
            got = res.singular_value.sel(pair=pair, layer=layer).values[: len(want)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * want[0])
            np.testing.assert_allclose(res.mean_diff.sel(pair=pair, layer=layer).values, np.mean(rows, axis=0),
                                       rtol=1e-5, atol=1e-6)
            assert int(res.rank99.sel(pair=pair, layer=layer)) == RANK[pair]
            assert 1 <= float(res.participation_ratio.sel(pair=pair, layer=layer)) <= RANK[pair] + 1e-6
    same = res.principal_angle.sel(pair="BB-BS", pair_b="BS-SS")
    unrelated = res.principal_angle.sel(pair="BB-BS", pair_b="BB-SB")
    assert float(same.max()) < 0.01 and float(unrelated.min()) > 89.9
    assert res.attrs["cp_relative_error"] < 1e-3
    assert not reused


def test_principal_angles_reference():
    a = np.eye(3)[:2]
    b = np.array([[1.0, 0, 0], [0, np.cos(0.3), np.sin(0.3)]])
    np.testing.assert_allclose(principal_angles(a, b), [0.0, np.degrees(0.3)], atol=1e-6)


def test_rank_rule_reuse_and_conflicts(planted, tmp_path):
    first, reused = decompose_store(planted, top_k=2)
    assert not reused and first.parent == planted.parent and ".decomp-" in first.name
    res = xr.open_zarr(first)
    assert res.attrs["cp_relative_error"] <= 0.05 and res.sizes["cp_rank"] <= 4
    assert decompose_store(planted, top_k=2) == (first, True)  # same settings: reused
    other, _ = decompose_store(planted, top_k=3)
    assert other != first
    with pytest.raises(UsageError, match="other settings"):
        decompose_store(planted, top_k=4, out=first)
    with pytest.raises(UsageError, match="unknown pair 'XX-YY'"):
        decompose_store(planted, pairs=["XX-YY"])
    assert not list(planted.parent.glob("*.partial"))


def test_a_memory_limit_picks_smaller_layer_tiles_with_the_same_spectra(planted):
    from analysis.compute import compute_on
    from analysis.decompose import _layer_tile, spectra

    ds = open_store(planted)
    whole = spectra(ds, top_k=2, pairs=["BS-SB"])
    gram = 16 * 18 * 8  # per layer of this store's 16 dims
    with compute_on(memory_limit=12 * gram, tile=1):
        assert _layer_tile(ds) == 1 < ds.resid.data.chunksize[2]  # the store's tile is 2 layers
        tiled = spectra(ds, top_k=2, pairs=["BS-SB"])
    np.testing.assert_allclose(tiled.singular_value.values, whole.singular_value.values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tiled.mean_diff.values, whole.mean_diff.values, rtol=1e-12, atol=1e-15)


def test_frozen_embeddings_pairs_from_one_read_equal_a_plain_reference(tmp_path):
    """SB = BB and SS = BS (frozen input embeddings): two pairs are exactly zero and four share one Gram; every
    pair's spectrum and mean difference equal a float64 reference computed pair by pair from the rows."""
    import zarr

    from analysis.decompose import spectra
    from store.testing import write_tiny_store
    from store.writer import consolidate

    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=5, lengths=(7, 3, 6, 2, 5), hidden=6, n_layers1=3,
                            store_dtype="float16", chunking=Chunking(prompt=2, layer=3, token=4))
    group = zarr.open_group(str(path), mode="r+")
    group["resid"][2] = group["resid"][0]  # SB = BB
    group["resid"][3] = group["resid"][1]  # SS = BS
    consolidate(path)
    ds = open_store(path)
    result = spectra(ds, top_k=2)
    resid = ds.resid.values.astype(np.float64)  # (pass, prompt, layer, token, dim), NaN on padding
    passes = [str(p) for p in ds.pass_.values]
    for pair in result.pair.values:
        left, right = str(pair).split("-")
        for layer in range(ds.sizes["layer"]):
            d = resid[passes.index(right), :, layer] - resid[passes.index(left), :, layer]
            d = d.reshape(-1, d.shape[-1])
            d = d[~np.isnan(d).any(axis=1)]
            want = np.sqrt(np.clip(np.linalg.eigvalsh(d.T @ d)[::-1], 0, None))
            got = result.singular_value.sel(pair=pair).isel(layer=layer).values
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{pair} {layer}")
            np.testing.assert_allclose(result.mean_diff.sel(pair=pair).isel(layer=layer).values, d.mean(axis=0),
                                       rtol=1e-9, atol=1e-12)
    assert not result.singular_value.sel(pair="BB-SB").values.any()
