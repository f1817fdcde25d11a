"""Format 4: arrays sharded along prompt, each shard written whole by the direct shard writer; resdiff, zarr and
tensorstore read them alike; damage to a shard is refused and found by verify."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from store.chunking import Chunking, shard_prompts, store_groups
from store.errors import CorruptChunk
from store.reader import open_store
from store.testing import chunk_files, damage_chunk, write_tiny_store
from store.verify import verify_store
from store.writer import StoreWriter

LENGTHS = (9, 9, 8, 7, 7, 6, 5, 4, 3, 3, 2)  # longest first, as a capture lays prompts out
KW = {"n_prompts": len(LENGTHS), "lengths": LENGTHS, "n_layers1": 3, "hidden": 8}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    # written in the same groups of 4 prompts (so with the same random values), in chunk files
    flat = write_tiny_store(root / "flat.zarr", chunking=Chunking(prompt=4, layer=3, token=4), **KW)
    sharded = write_tiny_store(root / "sharded.zarr", chunking=Chunking(prompt=2, layer=3, token=4, shard=4), **KW)
    return flat, sharded


def test_the_template_declares_shards_of_whole_write_groups(stores):
    _, sharded = stores
    meta = json.loads((sharded / "resid" / "zarr.json").read_text())
    codec = meta["codecs"][0]
    assert codec["name"] == "sharding_indexed"
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 4, 3, 12, 8]  # one pass, 4 prompts, all else
    # (9 tokens in chunks of 4: a shard spans 12)
    assert codec["configuration"]["chunk_shape"] == [1, 2, 3, 4, 8]
    assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert json.loads((sharded / "done" / "zarr.json").read_text())["chunk_grid"]["configuration"][
        "chunk_shape"] == [1, 4]  # a flag chunk per write group: two workers never share one


def test_one_file_per_pass_and_write_group(stores):
    flat, sharded = stores
    groups = store_groups(list(LENGTHS), {"prompt": 2, "shard": 4}, batch_size=8, batch_tokens=10**6)
    assert [(g.start, g.stop) for g in groups] == [(0, 4), (4, 8), (8, 11)]
    assert len(chunk_files(sharded, "resid")) == 4 * len(groups)
    assert len(chunk_files(flat, "resid")) > len(chunk_files(sharded, "resid"))


@pytest.mark.parametrize("name", ["resid", "final", "token_id", "n_tokens"])
def test_sharded_and_unsharded_stores_read_identically(stores, name):
    flat, sharded = stores
    want = open_store(flat)[name].values
    assert np.array_equal(open_store(sharded)[name].values, want, equal_nan=True)  # the direct shard reader
    assert np.array_equal(xr.open_zarr(sharded)[name].values, want, equal_nan=True)  # zarr's own reader


def test_direct_reads_of_unaligned_regions_match_zarr(stores):
    from store.reader import ArrayRegions

    _, sharded = stores
    regions = ArrayRegions(sharded, "resid")
    where = (slice(1, 3), slice(3, 10), slice(0, 2), slice(1, 11), slice(2, 7))
    assert np.array_equal(regions.read(where), regions.array[where], equal_nan=True)


def test_tensorstore_reads_the_shards(stores):
    ts = pytest.importorskip("tensorstore")
    flat, sharded = stores
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(sharded / "resid")}}
    got = ts.open(spec).result().read().result()
    assert np.array_equal(got, open_store(flat).resid.values, equal_nan=True)


def test_sound_sharded_store_verifies(stores):
    assert verify_store(stores[1], deep=True) == []


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_shard_is_refused_and_found(tmp_path, how):
    path = write_tiny_store(tmp_path / "s.zarr", chunking=Chunking(prompt=2, layer=3, token=4, shard=4), **KW)
    key = damage_chunk(path, "resid", how, n_bytes=64)
    with pytest.raises(CorruptChunk, match=key.replace("/", ".")):
        open_store(path).resid.load()
    assert any(f"resid: chunk {key} is corrupt" in line for line in verify_store(path, deep=True))


def test_a_damaged_shard_index_is_refused(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr", chunking=Chunking(prompt=2, layer=3, token=4, shard=4), **KW)
    file = chunk_files(path, "final")[0]
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF  # inside the index, before its checksum
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptChunk, match="shard index checksum"):
        open_store(path).final.load()


def test_a_deleted_shard_is_missing_not_padding(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr", chunking=Chunking(prompt=2, layer=3, token=4, shard=4), **KW)
    damage_chunk(path, "resid", "delete", index=1)
    problems = verify_store(path)
    assert any(line.startswith("resid:") and "missing" in line for line in problems), problems


def _partials(path):
    return sorted(path.rglob(".*.partial"))


def test_a_shard_row_is_written_once_when_its_last_write_group_is(tmp_path):
    """Write groups smaller than a shard row append their chunks to hidden ``.partial`` files (on disk, not in
    memory); the row's last group completes and renames them and only then are the row's done flags set (a run
    killed before loses the row, never half of one)."""
    from store.testing import tiny_template

    template = tiny_template(chunking=Chunking(prompt=2, layer=3, token=4, shard=4), **KW)
    path = tmp_path / "s.zarr"
    writer = StoreWriter.create(path, template)
    rng = np.random.default_rng(0)
    want = np.full((4, 3, 9, 8), np.nan, dtype=np.float32)
    for step, rows in enumerate((slice(0, 2), slice(2, 4))):
        assert chunk_files(path, "resid") == [] and not writer.done_pp()[0, :4].any()
        if step:  # the first group's chunks are already on disk, in the row's resid and final shards
            partials = _partials(path)
            assert [p.relative_to(path).parts[0] for p in partials] == ["final", "resid"], partials
            assert all(p.stat().st_size > 0 for p in partials)
        resid = rng.standard_normal((2, 3, 9, 8), dtype=np.float32)
        for i, n in enumerate(LENGTHS[rows]):
            resid[i, :, n:] = np.nan
        want[rows] = resid
        writer.write_region(0, rows, resid, resid[:, 0])
    assert len(chunk_files(path, "resid")) == 1 and writer.done_pp()[0, :4].all()
    assert not writer.done_pp()[0, 4:].any() and _partials(path) == []
    assert np.array_equal(xr.open_zarr(path).resid.isel(pass_=0, prompt=slice(0, 4)).values, want, equal_nan=True)
    assert np.array_equal(open_store(path).resid.isel(pass_=0, prompt=slice(0, 4)).values, want, equal_nan=True)


def test_closing_a_writer_inside_a_row_drops_its_partial_shards(tmp_path):
    from store.testing import tiny_template

    path = tmp_path / "s.zarr"
    with StoreWriter.create(path, tiny_template(chunking=Chunking(prompt=2, layer=3, token=4, shard=4), **KW)) as w:
        resid = np.random.default_rng(0).standard_normal((2, 3, 9, 8), dtype=np.float32)
        w.write_region(0, slice(0, 2), resid, resid[:, 0])
        assert len(_partials(path)) == 2
    assert _partials(path) == [] and chunk_files(path, "resid") == [] and not w.done_pp().any()


def test_write_groups_never_cross_a_shard_row():
    lengths = [40, 30, 30, 20, 20, 10, 10, 10, 5, 5, 5]
    groups = store_groups(lengths, {"prompt": 1, "shard": 4}, batch_size=3, batch_tokens=10**6)
    assert [(g.start, g.stop) for g in groups] == [(0, 3), (3, 4), (4, 7), (7, 8), (8, 11)]


def test_shard_rows_are_sized_by_their_stored_bytes():
    """The first row (the longest prompts) is the largest; its chunks with real tokens fit the target, one more
    prompt chunk would not (padding-only chunks are never stored, so they do not count)."""
    from store.chunking import stored_cells

    lengths = [64] * 10 + [8] * 990
    chunking = Chunking(prompt=5, layer=3, token=8)
    prompts = shard_prompts(lengths, chunking, bytes_per_position=1000, target_bytes=2_000_000)
    assert prompts == 180  # 640 cells of the ten long prompts + 170 x 8
    assert stored_cells(np.array(lengths[:prompts]), 5, 8) * 1000 <= 2_000_000
    assert stored_cells(np.array(lengths[:prompts + 5]), 5, 8) * 1000 > 2_000_000


def test_an_unsharded_store_of_format_3_stays_readable(tmp_path, stores):
    flat, _ = stores
    old = tmp_path / "v3.zarr"
    import shutil

    shutil.copytree(flat, old)
    StoreWriter(old).finalize({"resdiff_format_version": 3})
    assert open_store(old).attrs["resdiff_format_version"] == 3
    assert np.array_equal(open_store(old).resid.values, open_store(stores[1]).resid.values, equal_nan=True)
    assert verify_store(old, deep=True) == []


def test_a_region_holds_a_bounded_window_of_encoded_chunks(tmp_path, monkeypatch):
    """Encode tasks are submitted a window at a time and each one's bytes dropped once appended: a region's
    encoded chunks never sit in memory together (they did, held by the tasks, until the region was written)."""
    from concurrent.futures import Future

    from store import shard_io
    from store.testing import tiny_template

    path = tmp_path / "s.zarr"
    lengths = (40,) * 4
    template = tiny_template(chunking=Chunking(prompt=1, layer=1, token=1, shard=4), n_prompts=4, lengths=lengths,
                             n_layers1=3, hidden=8)
    live, peak = [0], [0]

    class Recorder:  # runs each task at once; counts the tasks whose bytes are not yet appended
        def submit(self, fn, *args):
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            future = Future()
            future.set_result(fn(*args))
            return future

    appended = shard_io.ShardFiles._append_all

    def append_all(self, encoded):
        live[0] -= 1
        return appended(self, encoded)

    monkeypatch.setattr(shard_io, "_threads", lambda: Recorder())
    monkeypatch.setattr(shard_io.ShardFiles, "_append_all", append_all)
    resid = np.random.default_rng(0).standard_normal((4, 3, 40, 8), dtype=np.float32)
    with StoreWriter.create(path, template) as writer:
        writer.write_region(0, slice(0, 4), resid, resid[:, 0])
    assert live[0] == 0 and 1 < peak[0] <= shard_io.ENCODE_WINDOW  # 480 inner chunks in 32 tasks
    assert np.array_equal(open_store(path).resid.isel(pass_=0).values, resid)


@pytest.mark.parametrize("fill_at", ["none", "some", "all"])
def test_a_chunk_of_only_nan_is_left_out_and_any_value_kept(tmp_path, fill_at):
    from store.chunk_io import ChunkFiles
    from store.testing import tiny_template

    path = tmp_path / "s.zarr"
    StoreWriter.create(path, tiny_template(chunking=Chunking(prompt=2, layer=3, token=4), **KW))
    import zarr

    files = ChunkFiles.for_array(zarr.open_array(path / "resid", mode="r"))
    block = np.ones(files.chunks, dtype=files.dtype)
    if fill_at == "some":
        block.flat[:-1] = np.nan  # one real value in the last place
    elif fill_at == "all":
        block[...] = np.nan
    parts = files.encode_parts(block)
    assert (parts is None) == (fill_at == "all")
    if parts is not None:
        assert files.encode(block) == b"".join(parts) and len(parts) == 2  # data, then its crc32c
        assert np.array_equal(files.decode(b"".join(parts), "k"), block, equal_nan=True)
