"""Decompositions on synthetic stores with planted structure, against plain numpy float64."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from analysis import open_store
from analysis.geometry.decompose import decompose_store, principal_angles
from store.chunking import Chunking
from store.errors import StoreConflict, UsageError
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
    with pytest.raises(StoreConflict, match="other settings"):
        decompose_store(planted, top_k=4, out=first)
    with pytest.raises(UsageError, match="unknown pair 'XX-YY'"):
        decompose_store(planted, pairs=["XX-YY"])
    assert not list(planted.parent.glob("*.partial"))


def test_layer_tiles_of_a_memory_limit_give_the_same_spectra(planted, monkeypatch):
    import importlib

    from analysis.compute.context import compute_on
    from analysis.compute.gram_sums import layer_tile

    module = importlib.import_module("analysis.geometry.decompose")
    ds = open_store(planted)
    whole = module.spectra(ds, top_k=2, pairs=["BS-SB", "BB-SS"])
    def tile(limit: int) -> int:
        with compute_on(memory_limit=limit, tile=1):
            try:
                return layer_tile(ds, 2)
            except UsageError as error:
                assert "too small to decompose" in str(error)
                return 0

    refused, fits = 10**3, 10**10
    assert tile(refused) == 0 and tile(fits) == ds.sizes["layer"]
    while fits - refused > 64:  # the least limit that fits, to 64 bytes: one layer at a time
        middle = (refused + fits) // 2
        refused, fits = (refused, middle) if tile(middle) else (middle, fits)
    assert tile(fits) == 1 < ds.sizes["layer"]
    tiles = [tile(x) for x in np.linspace(fits, 2 * fits, 50).astype(int)]
    assert tiles == sorted(tiles) and tiles[-1] == ds.sizes["layer"]  # tiles grow with the limit
    monkeypatch.setattr(module, "layer_tile", lambda ds, n_pair: 1)
    tiled = module.spectra(ds, top_k=2, pairs=["BS-SB", "BB-SS"])
    np.testing.assert_allclose(tiled.singular_value.values, whole.singular_value.values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tiled.mean_diff.values, whole.mean_diff.values, rtol=1e-12, atol=1e-15)


def test_shared_grams_split_on_the_first_different_addition():
    """Copy on write: pairs share a Gram while they receive the same additions, each against its own plain sum."""
    from analysis.compute.gram_sums import GramSums, _add_gram, _add_rows

    rng = np.random.default_rng(3)
    sums, plain = GramSums(4, 2, 3), np.zeros((4, 2, 3, 3))
    for step in range(16):
        layer = step % 2
        groups = np.zeros(4, dtype=int) + 1 if step < 4 else rng.integers(0, 3, 4)  # first: all pairs alike
        parts = []
        for g in range(3):  # pairs of a group get the same addition; group 0 gets zero
            members = list(np.flatnonzero(groups == g))
            rows = rng.standard_normal((5, 3))
            parts.append((members, None if g == 0 else _add_rows(rows) if step % 3 else _add_gram(rows.T @ rows)))
            plain[members, layer] += 0 if g == 0 else rows.T @ rows
        sums.add(layer, parts)
    for q in range(4):
        for layer in range(2):
            np.testing.assert_allclose(sums.gram(q, layer), plain[q, layer], rtol=1e-12, atol=1e-12)
    # equal additions keep one array; a different one splits it, and so does none
    shared, one = GramSums(3, 1, 2), np.ones((2, 2))
    shared.add(0, [([0, 1, 2], _add_gram(one))])
    assert len(shared.grams) == 1 and (shared.slot_ql[:, 0] == 0).all()
    shared.add(0, [([0, 1], _add_gram(one)), ([2], _add_gram(2 * one))])
    assert shared.slot_ql[0, 0] == shared.slot_ql[1, 0] != shared.slot_ql[2, 0]
    np.testing.assert_array_equal(shared.gram(0, 0), 2 * one)
    np.testing.assert_array_equal(shared.gram(2, 0), 3 * one)
    shared.add(0, [([1], _add_gram(one))])
    np.testing.assert_array_equal(shared.gram(0, 0), 2 * one)
    np.testing.assert_array_equal(shared.gram(1, 0), 3 * one)
    np.testing.assert_array_equal(shared.gram(2, 0), 3 * one)


def test_threads_making_slots_at_once_each_get_their_own():
    """Two threads adding at different layers (each under its own layer's lock) create slots at the same time:
    each Gram lands in its own pair and layer (a list whose appends are slow opens the window wide)."""
    import threading
    import time

    from analysis.compute.gram_sums import GramSums, _add_gram

    class SlowList(list):
        def append(self, item):
            super().append(item)
            time.sleep(0.05)

    sums = GramSums(1, 2, 2)
    sums.grams = SlowList()
    start = threading.Barrier(2)

    def add(layer: int) -> None:
        start.wait()
        sums.add(layer, [([0], _add_gram(np.full((2, 2), layer + 1.0)))])

    threads = [threading.Thread(target=add, args=(layer,)) for layer in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(sums.gram(0, 0), np.full((2, 2), 1.0))
    np.testing.assert_array_equal(sums.gram(0, 1), np.full((2, 2), 2.0))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_frozen_embeddings_pairs_from_one_read_equal_a_plain_reference(tmp_path, dtype):
    """SB = BB and SS = BS (frozen input embeddings): two pairs are exactly zero and four share one Gram; every
    pair's spectrum and mean difference equal a float64 reference computed pair by pair from the rows."""
    import zarr

    from analysis.geometry.decompose import spectra
    from store.testing import write_tiny_store
    from store.writer import consolidate

    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=5, lengths=(7, 3, 6, 2, 5), hidden=6, n_layers1=3,
                            store_dtype=dtype, chunking=Chunking(prompt=2, layer=3, token=4))
    group = zarr.open_group(str(path), mode="r+")
    resid = group["resid"][:]
    resid[:, :, 1:, 0] *= 40  # a sink at the first token
    resid[2], resid[3] = resid[0], resid[1]  # SB = BB, SS = BS
    group["resid"][:] = resid
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
    from analysis.compute.gram_sums import pair_grams

    pairs = [str(p).split("-") for p in result.pair.values]
    sums = pair_grams(ds, np.array([passes.index(a) for a, _ in pairs]), np.array([passes.index(b) for _, b in pairs]),
                      slice(0, ds.sizes["layer"]))
    assert len(sums.grams) == ds.sizes["layer"]  # one product per layer: four pairs share it, two are zero
    from analysis.geometry.outliers import MASSIVE_FACTOR, massive_positions

    found = massive_positions(ds).massive.values
    assert found.any()
    reading = spectra(ds, top_k=2, massive_factor=MASSIVE_FACTOR)  # each distinct pass's norms, once
    np.testing.assert_array_equal(reading.singular_value.values, spectra(ds, top_k=2, exclude_pt=found).singular_value)


@pytest.fixture(scope="module")
def sunk(tmp_path_factory):
    """A float16 store whose first token is a sink (40x the norm) from layer 1 on, in every pass."""
    import zarr

    from store.testing import write_tiny_store
    from store.writer import consolidate

    path = write_tiny_store(tmp_path_factory.mktemp("sunk") / "s.zarr", n_prompts=5, lengths=(9, 3, 7, 2, 8),
                            hidden=6, n_layers1=3, store_dtype="float16", chunking=Chunking(prompt=2, layer=3, token=2))
    group = zarr.open_group(str(path), mode="r+")
    resid = group["resid"][:]
    resid[:, :, 1:, 0, :] *= 40
    group["resid"][:] = resid
    consolidate(path)
    return path


@pytest.mark.parametrize("slab", ["chunk", "token chunk"])
def test_massive_positions_found_while_reading_equal_those_found_first(sunk, slab, monkeypatch):
    """Found from the same reads (one slab per prompt chunk, or several: norms first) or by massive_positions
    first, the same positions are left out: the same spectra; and they were there to leave out."""
    import importlib

    from analysis.geometry.outliers import MASSIVE_FACTOR, massive_positions

    module = importlib.import_module("analysis.geometry.decompose")
    ds = open_store(sunk)
    if slab == "token chunk":
        monkeypatch.setattr("analysis.compute.gram_sums.token_slab",
                            lambda rows, cells, size, chunk_token, extent, direct: chunk_token)
    found = massive_positions(ds).massive.values
    longer = ds.n_tokens.values > 2  # of two tokens, the median is halfway to the sink
    assert (found[:, 0] == longer).all() and found.sum() == longer.sum() > 0
    first = module.spectra(ds, top_k=2, exclude_pt=found)
    reading = module.spectra(ds, top_k=2, massive_factor=MASSIVE_FACTOR)
    kept = module.spectra(ds, top_k=2)
    np.testing.assert_array_equal(reading.singular_value.values, first.singular_value.values)
    np.testing.assert_array_equal(reading.mean_diff.values, first.mean_diff.values)
    assert not np.allclose(kept.singular_value.values, first.singular_value.values)
    monkeypatch.setattr(module, "layer_tile", lambda ds, n_pair: 1)  # tiles: found first, in a pass of their own
    tiled = module.spectra(ds, top_k=2, massive_factor=MASSIVE_FACTOR)
    np.testing.assert_allclose(tiled.singular_value.values, first.singular_value.values, rtol=1e-12, atol=1e-12)


def test_a_cluster_gives_the_local_threads_spectra(planted):
    """On a dask.distributed cluster (loopback) each task returns its own Grams, merged by the client."""
    import importlib

    from analysis.compute.context import compute_on

    module = importlib.import_module("analysis.geometry.decompose")
    ds = open_store(planted)
    local = module.spectra(ds, top_k=2)
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client, compute_on(client):
        remote = module.spectra(ds, top_k=2)
    np.testing.assert_allclose(remote.singular_value.values, local.singular_value.values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(remote.mean_diff.values, local.mean_diff.values, rtol=1e-12, atol=1e-15)
