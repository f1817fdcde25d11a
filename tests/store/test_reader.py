"""open_store's made-up padding chunks, for every dtype a store holds."""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.reader import skip_padding_chunks


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
