"""Another Zarr v3 implementation (tensorstore) reads a resdiff store identically and checks its checksums."""

from __future__ import annotations

import numpy as np
import pytest

from store.chunking import Chunking
from store.reader import open_store
from store.testing import damage_chunk, fill_lens_statistics, write_tiny_store

ts = pytest.importorskip("tensorstore")


@pytest.fixture
def store(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=6, lengths=(9, 7, 5, 3, 2, 1), store_dtype="float16",
                            chunking=Chunking(prompt=2, layer=4, token=4))
    return fill_lens_statistics(path)


def _read(path, name):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
    return ts.open(spec).result().read().result()


@pytest.mark.parametrize("name", ["resid", "final", "entropy", "kl", "topk_id", "rise_shift", "token_id", "n_tokens",
                                  "done", "lens_done"])
def test_tensorstore_reads_what_resdiff_reads(store, name):
    ours = open_store(store)[name].values
    theirs = _read(store, name)
    assert theirs.dtype == ours.dtype and np.array_equal(theirs, ours, equal_nan=ours.dtype.kind == "f")


def test_tensorstore_refuses_a_flipped_chunk(store):
    damage_chunk(store, "resid", "flip")
    with pytest.raises(ValueError, match="Digest mismatch"):
        _read(store, "resid")
