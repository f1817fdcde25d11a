"""Store round trip, laziness, done flags and validation, on real Zarr stores on disk."""

from __future__ import annotations

import json
import warnings

import dask
import numpy as np
import pytest
import xarray as xr

from store.errors import StoreFormatError, StoreNotFound
from store.reader import check_store, describe_store, open_store
from store.schema import FORMAT_ATTR
from store.testing import CountingScheduler, assert_stores_equal, tiny_template, write_tiny_store
from store.writer import StoreWriter


def test_round_trip_regions_and_padding(tmp_path):
    template = tiny_template(n_prompts=3, lengths=(5, 3, 4))
    writer = StoreWriter.create(tmp_path / "s.zarr", template)
    rng = np.random.default_rng(0)
    resid = rng.standard_normal((2, 3, 5, 8)).astype("float32")
    final = rng.standard_normal((2, 5, 8)).astype("float32")
    writer.write_region(2, slice(0, 2), resid, final)
    ds = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(ds.resid.sel(pass_="SB").values[:2], resid)
    np.testing.assert_array_equal(ds.final.isel(pass_=2).values[:2], final)
    assert np.isnan(ds.resid.sel(pass_="BB").values).all()  # unwritten regions read as NaN
    assert ds.done.values.tolist() == [[False] * 3, [False] * 3, [True, True, False], [False] * 3]
    assert ds.token_id.values[1].tolist() == [10, 11, 12, -1, -1]
    assert ds.token_str.values[1].tolist() == ["t10", "t11", "t12", "", ""]
    assert ds.n_tokens.values.tolist() == [5, 3, 4]
    assert list(ds.model.values) == ["base", "sft", "base", "sft"]


def test_open_zarr_is_lazy_and_silent(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with dask.config.set(scheduler=CountingScheduler(0)):
            ds = xr.open_zarr(path)
            ss = ds.sel(pass_="SS")
            mean = ss.resid.mean(("token", "dim"))
            assert isinstance(mean.data, dask.array.Array)
    assert ss.resid.dims == ("prompt", "layer", "token", "dim")
    assert mean.compute().shape == (3, 3)


def test_assert_stores_equal_detects_differences(tmp_path):
    a = write_tiny_store(tmp_path / "a.zarr", seed=0)
    b = write_tiny_store(tmp_path / "b.zarr", seed=0)
    c = write_tiny_store(tmp_path / "c.zarr", seed=1)
    assert_stores_equal(a, b)
    with pytest.raises(AssertionError, match="variable"):
        assert_stores_equal(a, c)


def test_template_only_write_has_no_data_chunks(tmp_path):
    StoreWriter.create(tmp_path / "s.zarr", tiny_template())
    chunk_files = [p for p in (tmp_path / "s.zarr" / "resid").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunk_files == []


def test_validation_errors(tmp_path):
    with pytest.raises(StoreNotFound, match="no resdiff store"):
        open_store(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreFormatError, match=r"no zarr\.json"):
        open_store(tmp_path / "plain")
    path = write_tiny_store(tmp_path / "s.zarr")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"][FORMAT_ATTR] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreFormatError, match="newer than this resdiff reads"):
        check_store(path)


def test_describe_store(tmp_path):
    text = describe_store(write_tiny_store(tmp_path / "s.zarr"))
    assert "pass_=4, prompt=3, layer=3, token=5, dim=8" in text
    assert "complete   12/12" in text



def test_the_template_is_written_from_one_task_per_array_with_xarrays_own_metadata(tmp_path):
    """Many small chunks must not mean a task per chunk (20 GB at 5,000 short prompts), and the shortcut
    must write exactly what xarray writes from the chunked template."""
    import json

    from store.chunking import Chunking
    from store.schema import encoding
    from store.testing import tiny_template
    from store.writer import StoreWriter, _one_task_per_array, consolidate

    template = tiny_template(n_prompts=7, lengths=(13, 11, 6, 5, 3, 2, 1), n_layers1=4, hidden=6,
                             store_dtype="float16", chunking=Chunking(prompt=2, layer=4, token=4))
    light, chunks = _one_task_per_array(template)
    assert all(light[name].data.npartitions == 1 for name in chunks)
    assert chunks["resid"] == template.resid.data.chunksize and template.resid.data.npartitions > 1
    StoreWriter.create(tmp_path / "new.zarr", template)
    template.to_zarr(str(tmp_path / "old.zarr"), mode="w-", compute=False, encoding=encoding(template),
                     consolidated=False)
    consolidate(tmp_path / "old.zarr")
    old = {p.relative_to(tmp_path / "old.zarr"): p for p in (tmp_path / "old.zarr").rglob("*") if p.is_file()}
    new = {p.relative_to(tmp_path / "new.zarr"): p for p in (tmp_path / "new.zarr").rglob("*") if p.is_file()}
    assert sorted(old) == sorted(new)
    for rel, path in old.items():
        if path.name == "zarr.json":
            assert json.loads(path.read_text()) == json.loads(new[rel].read_text()), rel
        else:
            assert path.read_bytes() == new[rel].read_bytes(), rel
