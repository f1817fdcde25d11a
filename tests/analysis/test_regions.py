"""Ragged stores read by runs of prompt chunks: straight from Zarr or through Dask, against float64 references."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr

from analysis import open_store, pair_metrics, pass_metrics, real_positions
from analysis.compute.regions import prompt_runs
from store.chunking import Chunking, real_blocks
from store.reader import direct_regions, skip_padding_chunks
from store.testing import CountingScheduler, write_tiny_store

LENGTHS = (13, 11, 6, 5, 3, 2, 1)  # store order: longest first


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_store(tmp_path_factory.mktemp("ragged") / "s.zarr", n_prompts=len(LENGTHS), lengths=LENGTHS,
                            n_layers1=4, hidden=6, store_dtype="float16", chunking=Chunking(prompt=2, layer=4, token=4))


def _opened(path, how: str) -> xr.Dataset:
    if how == "direct":  # as open_store gives it: regions read straight from Zarr
        return open_store(path)
    if how == "dask":  # the same chunks, read through their Dask tasks
        return skip_padding_chunks(xr.open_zarr(path))
    return open_store(path).chunk({"token": -1})  # no padding-only chunks: the padded-block path


def test_only_an_unmodified_local_store_is_read_directly(path):
    ds = open_store(path)
    assert direct_regions(ds.resid) is not None
    assert direct_regions(_opened(path, "dask").resid) is None
    assert direct_regions(ds.resid.isel(layer=slice(0, 2))) is None
    assert direct_regions((ds.resid * 2).rename("resid")) is None
    norm = pass_metrics(ds).norm
    graph = dict(norm.data.__dask_graph__())
    assert not [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("open_dataset-")]


@pytest.mark.parametrize("how", ["direct", "dask", "padded"])
def test_metrics_match_a_float64_reference(path, how):
    ds = _opened(path, how)
    # Lazy: building computes nothing (the other ways open labels lazily, and reading them computes).
    with dask.config.set(scheduler=CountingScheduler(0 if how == "direct" else 100)):
        per_pass, per_pair = pass_metrics(ds), pair_metrics(ds)
    h = open_store(path).resid.values.astype(np.float64)  # (pass, prompt, layer, token, dim)
    norm = np.sqrt((h ** 2).sum(-1))
    np.testing.assert_allclose(per_pass.norm.values, norm, rtol=1e-6, equal_nan=True)
    prev = np.full(norm.shape, np.nan)
    prev[:, :, 1:] = (h[:, :, 1:] * h[:, :, :-1]).sum(-1) / (norm[:, :, 1:] * norm[:, :, :-1])
    np.testing.assert_allclose(per_pass.cosine_prev.values, prev, rtol=1e-5, atol=1e-6, equal_nan=True)
    passes = [str(p) for p in ds.pass_.values]
    for q, (left, right) in enumerate(zip(per_pair.left.values, per_pair.right.values, strict=True)):
        a, b = h[passes.index(left)], h[passes.index(right)]
        np.testing.assert_allclose(per_pair.norm_diff.values[q], np.sqrt(((b - a) ** 2).sum(-1)), rtol=1e-6,
                                   equal_nan=True)
        cos = (a * b).sum(-1) / np.sqrt((a ** 2).sum(-1) * (b ** 2).sum(-1))
        np.testing.assert_allclose(per_pair.cosine_sim.values[q], cos, rtol=1e-6, equal_nan=True)
    real = np.arange(ds.sizes["token"])[None, :] < np.array(LENGTHS)[:, None]
    norm_pt = np.moveaxis(per_pass.norm.values, 2, 3)  # (pass, prompt, token, layer)
    assert np.isfinite(norm_pt[:, real]).all() and np.isnan(norm_pt[:, ~real]).all()


@pytest.mark.parametrize("rows", [None, 5, 1000])
def test_real_positions_read_either_way_are_the_real_cells_prompt_by_prompt(path, rows):
    want = open_store(path).resid.values
    for how in ("direct", "dask"):
        got = real_positions(_opened(path, how), rows=rows)
        prompt_row = np.asarray(got.prompt.values)  # labels are store rows in this synthetic store
        token = np.asarray(got.token.values)
        assert list(zip(prompt_row, token, strict=True)) == [(p, t) for p, n in enumerate(LENGTHS) for t in range(n)]
        values = got.transpose("pass_", "position", "layer", "dim").values
        assert np.array_equal(values, want[:, prompt_row, :, token].transpose(1, 0, 2, 3))


def test_runs_cover_every_real_chunk_once():
    lengths = np.array([40, 33, 20, 9, 9, 8, 3, 1, 1])
    runs = prompt_runs(lengths, 2, 8, 40, cell_bytes=10, target_bytes=1500)
    assert len(runs) > 1 and runs[-1].rows.stop == len(lengths)
    covered = [rows for run in runs for rows in run.chunk_rows]
    assert covered == [slice(s, min(s + 2, len(lengths))) for s in range(0, len(lengths), 2)]
    real = real_blocks(lengths, 2, 8, 40)
    extents = [e for run in runs for e in run.extents]
    assert extents == [min(40, int(r.sum()) * 8) for r in real]
    for run in runs[:-1]:  # runs close before they pass the target (unless one chunk alone does)
        assert len(run.chunk_rows) == 1 or sum(
            (r.stop - r.start) * e * 10 for r, e in zip(run.chunk_rows, run.extents, strict=True)) <= 1500


def test_cluster_workers_read_the_regions_themselves(path):
    from distributed import Client, LocalCluster

    ds = open_store(path)
    want = pair_metrics(ds).norm_diff.values, real_positions(ds).values
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster):
        got = pair_metrics(ds).norm_diff.compute().values, real_positions(ds).compute().values
    assert np.array_equal(got[0], want[0], equal_nan=True) and np.array_equal(got[1], want[1])


def test_the_memory_model_counts_a_run_task(path):
    from analysis.compute import ragged_sums
    from analysis.compute.context import tile_bytes

    direct, through_dask = _opened(path, "direct"), _opened(path, "dask")
    n_terms = 4 + 2 * 6  # four passes, their six pairs (a --no-lens store)
    plan = ragged_sums._plan(direct, n_terms)
    longest = plan[0][0]  # the first run holds the longest prompts
    output = n_terms * (longest.rows.stop - longest.rows.start) * direct.sizes["layer"] * direct.sizes["token"] * 8
    cell = 4 * direct.sizes["layer"] * direct.sizes["dim"] * 2  # float16, all passes
    whole_run = sum((r.stop - r.start) * e * cell for r, e in zip(longest.chunk_rows, longest.extents, strict=True))
    assert ragged_sums.task_bytes(through_dask, n_terms) >= output + whole_run  # assembled: the run in memory
    assert output < ragged_sums.task_bytes(direct, n_terms) <= ragged_sums.task_bytes(through_dask, n_terms)
    assert tile_bytes(direct) >= ragged_sums.task_bytes(direct, n_terms)
