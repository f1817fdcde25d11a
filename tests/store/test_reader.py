"""open_store's made-up padding chunks, for every dtype a store holds; region reads."""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.reader import ArrayRegions, skip_padding_chunks
from store.testing import write_tiny_store


def test_padding_only_chunks_of_every_dtype_are_made_up_as_their_fill():
    n_tokens = np.array([4, 3, 1, 1])  # longest first: rows 2-3 have no token in the second token chunk
    strings = np.array([["a", "b", "c", "d"], ["e", "f", "g", ""], ["h", "", "", ""], ["i", "", "", ""]],
                       dtype=np.dtypes.StringDType())
    ds = xr.Dataset(
        {"resid": (("prompt", "token"), np.ones((4, 4), np.float32)),
         "ids": (("prompt", "token"), np.ones((4, 4), int))},
        coords={"n_tokens": ("prompt", n_tokens), "token_str": (("prompt", "token"), strings)},
    ).chunk({"prompt": 2, "token": 2})
    skipped = skip_padding_chunks(ds)
    for name, fill in (("resid", np.nan), ("ids", -1), ("token_str", "")):
        block = skipped[name].data.blocks[1, 1].compute()
        assert block.dtype == ds[name].dtype
        np.testing.assert_array_equal(block, np.full((2, 2), fill, dtype=ds[name].dtype))
        np.testing.assert_array_equal(skipped[name].data.blocks[0, 1].compute(), ds[name].data.blocks[0, 1].compute())


def test_array_regions_equal_zarrs_reads_on_a_ragged_store(tmp_path):
    import zarr

    from store.chunking import Chunking

    lengths = (9, 7, 3, 2, 1)  # longest first, as capture lays them out; token chunks of 2
    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=5, lengths=lengths,
                            chunking=Chunking(prompt=2, layer=3, token=2))
    regions = ArrayRegions(path, "resid")
    array = zarr.open_group(str(path), mode="r")["resid"]
    chunk_file = lambda *coords: path.joinpath("resid", "c", *map(str, coords))  # noqa: E731
    assert chunk_file(0, 0, 0, 0, 0).exists() and not chunk_file(0, 2, 0, 1, 0).exists()  # padding: never written
    for where in [(slice(None), slice(0, 2), slice(None), slice(0, 10), slice(None)),  # whole store chunks
                  (slice(None), slice(2, 5), slice(None), slice(0, 4), slice(None)),  # absent chunks read as NaN
                  (slice(1, 3), slice(1, 4), slice(None), slice(0, 3), slice(None))]:  # unaligned
        np.testing.assert_array_equal(regions.read(where), array[where])
    assert np.isnan(regions.read((slice(None), slice(4, 5), slice(None), slice(2, 4), slice(None)))).all()
    assert regions._direct is not None  # a local store: read from the chunk files, not through zarr
