"""Checksummed chunks: flipped, truncated and deleted chunks are found by every reader and by verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from cli import main
from store.chunking import Chunking
from store.errors import CorruptChunk
from store.integrity import corrupt_chunks, missing_chunks
from store.reader import open_store
from store.testing import chunk_files, damage_chunk, fill_lens_statistics, write_tiny_store
from store.verify import verify_store
from store.writer import consolidate

LENGTHS = (9, 7, 5, 3, 2, 1)


@pytest.fixture
def store(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=len(LENGTHS), lengths=LENGTHS, store_dtype="float16",
                            chunking=Chunking(prompt=2, layer=4, token=4))
    return fill_lens_statistics(path)


def test_every_array_carries_a_crc32c_checksum(store):
    for meta in store.glob("*/zarr.json"):
        codecs = [c["name"] for c in json.loads(meta.read_text())["codecs"]]
        assert codecs[-1] == "crc32c", (meta.parent.name, codecs)


def test_zarr_and_xarray_read_the_direct_writes_identically(store):
    ours, theirs = open_store(store), xr.open_zarr(store)
    for name in ("resid", "entropy", "topk_id", "token_id"):
        assert np.array_equal(ours[name].values, theirs[name].values, equal_nan=True), name


@pytest.mark.parametrize(("name", "how"), [("resid", "flip"), ("resid", "truncate"), ("entropy", "flip"),
                                           ("kl", "truncate"), ("topk_id", "flip")])
def test_a_damaged_chunk_is_named_by_the_reader(store, name, how):
    key = damage_chunk(store, name, how)
    with pytest.raises(CorruptChunk) as caught:
        open_store(store)[name].load()
    assert f"chunk {key} of {name!r}" in str(caught.value) and "verify --deep" in str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert any(key in p for p in corrupt_chunks(store, deep=True))
    problems = verify_store(store)
    assert any(name in p and key in p for p in problems), problems


@pytest.mark.parametrize("name", ["resid", "kl", "entropy", "token_id", "final"])
def test_a_deleted_chunk_of_a_complete_region_is_missing_not_padding(store, name):
    key = damage_chunk(store, name, "delete")
    problems = missing_chunks(store)
    assert len(problems) == 1 and problems[0].startswith(f"{name}: 1 chunk(s)") and key in problems[0], problems
    assert any(name in p for p in verify_store(store))


def test_deep_verify_decodes_what_the_sample_may_miss(store, capsys, monkeypatch):
    from store import integrity

    monkeypatch.setattr(integrity, "SAMPLE", 1)
    files = chunk_files(store, "topk_id")
    key = damage_chunk(store, "topk_id", "flip", index=len(files) - 1)  # ids: not read by the value checks
    sampled = integrity.corrupt_chunks(store, deep=False)
    assert main(["verify", "--deep", str(store)]) == 1
    assert f"topk_id: chunk {key} is corrupt" in capsys.readouterr().out
    assert len([p for p in sampled if "topk_id" in p]) <= 1  # one file of that array decoded at most


def test_commands_print_one_line_for_a_corrupt_chunk(store, capsys):
    key = damage_chunk(store, "resid", "flip")
    assert main(["factorial", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"chunk {key} of 'resid' is corrupt" in err, err


def test_zarrs_own_read_errors_become_one_line(store, capsys):
    damage_chunk(store, "token_str", "flip")  # strings: read by zarr, which checks the checksum itself
    with pytest.raises(ValueError, match="checksum"):
        xr.open_zarr(store).token_str.load()
    assert main(["export-json", str(store), "--out", str(store.parent / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "failed to decode" in err and "verify --deep" in err, err


def test_a_store_of_format_2_without_checksums_stays_readable(tmp_path):
    from store.schema import compressors

    path = write_tiny_store(tmp_path / "old.zarr", lengths=(5, 3, 4))
    # rewrite it as format 2 wrote it: the same arrays without the crc32c codec
    old = xr.open_zarr(path).load()
    old.attrs["resdiff_format_version"] = 2
    legacy = tmp_path / "v2.zarr"
    enc = {name: {"compressors": compressors("lz4")[:-1]} for name in old.variables}
    old.to_zarr(legacy, encoding=enc, consolidated=False)
    consolidate(legacy)
    ds = open_store(legacy)
    assert np.array_equal(ds.resid.values, old.resid.values, equal_nan=True)
    assert verify_store(legacy, deep=True) == []


def test_orphan_partial_files_are_ignored_by_verify_and_removed_by_the_next_capture(tmp_path, tiny_pair):
    store = tmp_path / "s.zarr"
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--prompt", "Hi there."]
    assert main(args) == 0
    # what a write refused by a full disk leaves: a temporary beside the chunk it was to replace
    orphans = [chunk_files(store, name)[0].with_name(f".0.{'ab' * 16}.partial") for name in ("entropy", "resid")]
    for orphan in orphans:
        orphan.write_bytes(b"half a chunk")
    assert verify_store(store, deep=True) == []
    assert main(args) == 0 and not any(o.exists() for o in orphans)  # complete: nothing to do but clean up


def test_csv_exports_guard_cells_a_spreadsheet_would_run(tmp_path):
    import csv

    from analysis.report.export_rows import export_rows

    out = export_rows([{"token": '=HYPERLINK("http://evil.example","x")', "value": -1.5},
                       {"token": "+1", "value": 2.0}, {"token": "-ing", "value": 0.0}, {"token": "ok", "value": 1}],
                      tmp_path / "rows.csv")
    cells = list(csv.DictReader(out.open()))
    assert [c["token"] for c in cells] == ["'=HYPERLINK(\"http://evil.example\",\"x\")", "'+1", "'-ing", "ok"]
    assert [c["value"] for c in cells] == ["-1.5", "2.0", "0.0", "1"]  # numbers stay numbers


def test_netcdf_export_refuses_text_it_would_cut_at_a_nul(tmp_path, capsys):
    import zarr

    path = write_tiny_store(tmp_path / "s.zarr", lengths=(5, 3, 4))
    zarr.open_group(str(path), mode="r+", use_consolidated=False)["token_str"][0, 1] = "a\x00b"
    out = tmp_path / "x.nc"
    assert main(["export-netcdf", str(path), str(out)]) == 2
    assert "hold a NUL character" in capsys.readouterr().err and not out.exists()
    assert main(["export-netcdf", str(path), str(out), "--sel", "prompt=1"]) == 0


def test_model_paths_are_recorded_absolute_and_relative_to_the_store(tmp_path, tiny_pair, monkeypatch):
    import shutil

    from store.location import find_model_dir

    monkeypatch.chdir(tiny_pair[2].parent)  # a relative cache dir: the models' paths are relative too
    store = tmp_path / "runs" / "s.zarr"
    assert main(["capture", "--cache-dir", tiny_pair[2].name, "--store", str(store), "--quiet", "--no-lens",
                 "--prompt", "Hi there."]) == 0
    record = open_store(store).attrs["models"]["base"]
    assert Path(record["ref"]).is_absolute() and Path(record["tokenizer"]).is_absolute()
    monkeypatch.chdir(tmp_path)  # token text no longer depends on the working directory
    assert find_model_dir(record, store) == Path(record["ref"])
    moved = tmp_path / "moved"  # the store and its models moved together
    shutil.copytree(tmp_path / "runs", moved / "runs")
    shutil.copytree(Path(record["ref"]), moved / "runs" / record["ref_from_store"])
    assert find_model_dir({**record, "ref": "/nowhere"}, moved / "runs" / "s.zarr") == (
        moved / "runs" / record["ref_from_store"])
