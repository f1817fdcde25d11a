"""Direct chunk writes read back by zarr exactly as zarr's own writes."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from store.chunk_io import ChunkFiles
from store.schema import compressors
from store.units import CODECS


def _array(path, codec: str, dtype="float16", fill=np.nan):
    return zarr.create_array(str(path), shape=(2, 7, 3, 13, 4), chunks=(1, 3, 3, 4, 4), dtype=dtype,
                             fill_value=fill, compressors=compressors(codec), overwrite=True)


def _values(rng, shape, dtype="float16"):
    values = rng.normal(size=shape).astype(dtype)
    if values.dtype.kind == "f":
        values[:, :, 9:] = np.nan  # the padding tail of short prompts
        values[1, :, 5:] = np.nan
    return values


def _files(path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != "zarr.json"}


@pytest.mark.parametrize("codec", CODECS)
def test_direct_writes_read_back_as_zarrs_own(tmp_path, codec):
    rng = np.random.default_rng(0)
    ours, theirs = _array(tmp_path / "ours.zarr", codec), _array(tmp_path / "theirs.zarr", codec)
    writer = ChunkFiles.for_array(ours)
    assert writer is not None
    regions = [(0, slice(0, 3), slice(None), slice(0, 12), slice(None)),
               (0, slice(3, 7), slice(None), slice(0, 13), slice(None)),  # the edge chunks of both axes
               (1, slice(0, 6), slice(None), slice(0, 8), slice(None))]
    for where in regions:
        shape = tuple(len(range(*s.indices(n))) for s, n in zip(where[1:], ours.shape[1:], strict=True))
        values = _values(rng, shape)
        assert writer.aligned(where)
        writer.write(where, values)
        theirs[where] = values
    np.testing.assert_array_equal(ours[...], theirs[...])
    assert _files(tmp_path / "ours.zarr").keys() == _files(tmp_path / "theirs.zarr").keys()
    if codec == "none":  # the bytes codec alone is deterministic: the files themselves are equal
        assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "theirs.zarr")


def test_fill_only_chunks_are_not_written_and_stale_ones_removed(tmp_path):
    array = _array(tmp_path / "s.zarr", "lz4")
    writer = ChunkFiles.for_array(array)
    where = (0, slice(0, 3), slice(None), slice(0, 8), slice(None))
    writer.write(where, np.ones((3, 3, 8, 4), dtype="float16"))
    assert len(_files(tmp_path / "s.zarr")) == 2
    padding = np.ones((3, 3, 8, 4), dtype="float16")
    padding[:, :, 4:] = np.nan
    writer.write(where, padding)
    assert list(_files(tmp_path / "s.zarr")) == ["c/0/0/0/0/0"]
    np.testing.assert_array_equal(array[where], padding)


def test_integer_arrays_with_their_fill_value(tmp_path):
    rng = np.random.default_rng(1)
    ours = _array(tmp_path / "ours.zarr", "zstd", dtype="int32", fill=-1)
    theirs = _array(tmp_path / "theirs.zarr", "zstd", dtype="int32", fill=-1)
    values = rng.integers(-1, 5, size=(3, 3, 13, 4)).astype("int32")
    values[:, :, 4:8] = -1
    where = (1, slice(0, 3), slice(None), slice(None), slice(None))
    ChunkFiles.for_array(ours).write(where, values)
    theirs[where] = values
    np.testing.assert_array_equal(ours[...], theirs[...])
    assert _files(tmp_path / "ours.zarr").keys() == _files(tmp_path / "theirs.zarr").keys()


def test_unaligned_regions_and_other_stores_are_left_to_zarr(tmp_path):
    array = _array(tmp_path / "s.zarr", "lz4")
    writer = ChunkFiles.for_array(array)
    assert not writer.aligned((0, slice(1, 3), slice(None), slice(0, 8), slice(None)))
    assert not writer.aligned((0, slice(0, 3), 1, slice(0, 8), slice(None)))  # an int on a chunk of 3
    assert not writer.aligned((0, slice(0, 3), slice(None), slice(0, 6), slice(None)))
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(4,), chunks=(2,), dtype="float32")
    assert ChunkFiles.for_array(in_memory) is None
    sharded = zarr.create_array(str(tmp_path / "sh.zarr"), shape=(4, 4), chunks=(2, 2), shards=(4, 4),
                                dtype="float32")
    assert ChunkFiles.for_array(sharded) is None


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("dtype, fill", [("float16", np.nan), ("int32", -1)])
def test_direct_reads_equal_zarrs_reads(tmp_path, codec, dtype, fill):
    rng = np.random.default_rng(2)
    array = _array(tmp_path / "s.zarr", codec, dtype=dtype, fill=fill)
    values = _values(rng, (3, 3, 12, 4), dtype) if dtype == "float16" else rng.integers(0, 9, (3, 3, 12, 4))
    array[0, 0:3, :, 0:12] = values  # chunks past token 12 and of prompts 3.. stay absent: the fill value
    reader = ChunkFiles.for_array(array)
    regions = [(slice(0, 1), slice(0, 3), slice(0, 3), slice(0, 12), slice(0, 4)),
               (slice(0, 2), slice(0, 7), slice(0, 3), slice(0, 13), slice(0, 4)),  # edges, absent chunks
               (slice(0, 1), slice(3, 6), slice(0, 3), slice(4, 8), slice(0, 4)),
               (slice(1, 2), slice(6, 7), slice(0, 3), slice(12, 13), slice(0, 4))]
    unaligned = [(slice(0, 1), slice(1, 5), slice(1, 2), slice(3, 11), slice(1, 3)),  # inside and across chunks
                 (slice(0, 2), slice(2, 7), slice(0, 3), slice(7, 13), slice(0, 4)),  # into absent chunks, edges
                 (slice(0, 1), slice(2, 2), slice(0, 3), slice(0, 4), slice(0, 4))]  # empty
    for where in regions + unaligned:
        assert reader.aligned(where) == (where in regions) and reader.readable(where)
        got = reader.read(where)
        assert got.dtype == array.dtype and got.shape == array[where].shape
        np.testing.assert_array_equal(got, array[where])
    assert not reader.readable((0, slice(0, 3), slice(0, 3), slice(0, 12), slice(0, 4)))  # ints go to zarr


def test_reads_work_in_a_forked_child_after_the_parent_used_the_threads(tmp_path):
    import multiprocessing

    array = zarr.create_array(tmp_path / "a.zarr", shape=(4, 6), chunks=(2, 3), dtype="float32", fill_value=np.nan)
    array[...] = np.arange(24, dtype=np.float32).reshape(4, 6)
    direct = ChunkFiles.for_array(array)
    expected = direct.read((slice(0, 4), slice(0, 6)))  # the parent's pool now has threads
    with multiprocessing.get_context("fork").Pool(1) as pool:  # a child without them (as DataLoader workers)
        got = pool.apply_async(direct.read, ((slice(0, 4), slice(0, 6)),)).get(timeout=60)
    np.testing.assert_array_equal(got, expected)
