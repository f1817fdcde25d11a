"""The one rule for an output location and a mode (``store.target.claim``), and the commands that follow it."""

from __future__ import annotations

import json

import pytest

from store.errors import StoreConflict, StoreFormatError, UsageError
from store.target import WriteMode, claim
from store.testing import write_tiny_store


@pytest.fixture
def stored(tmp_path):
    return write_tiny_store(tmp_path / "s.zarr")


@pytest.mark.parametrize("mode", list(WriteMode))
def test_nothing_there_is_new_in_every_mode(tmp_path, mode):
    assert claim(tmp_path / "none.zarr", mode) == "new"


def test_each_mode_on_an_existing_store(stored):
    assert claim(stored, "resume") == "existing"
    assert claim(stored, "overwrite") == "replace"
    assert stored.exists(), "claiming removes nothing: a command that fails later loses nothing"
    with pytest.raises(StoreConflict, match="--out PATH"):
        claim(stored, "create", flag="--out")


def test_overwrite_refuses_what_resdiff_did_not_write(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    other_zarr = tmp_path / "other.zarr"
    other_zarr.mkdir()
    (other_zarr / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    for path in (folder, a_file, other_zarr):
        with pytest.raises(StoreFormatError, match="not removed"):
            claim(path, "overwrite")
    assert claim(other_zarr, "overwrite", resdiff=False) == "replace"  # a derived output (a decomposition)
    with pytest.raises(StoreFormatError, match="not removed"):
        claim(folder, "overwrite", resdiff=False)


def test_resume_refuses_what_is_not_a_store(tmp_path):
    folder, a_file = tmp_path / "thesis", tmp_path / "notes.txt"
    folder.mkdir()
    a_file.write_text("precious")
    for path in (folder, a_file):
        with pytest.raises(StoreConflict, match="is not a Zarr store, so it is neither resumed nor replaced; "
                                                "choose another --out"):
            claim(path, "resume", flag="--out")
    assert a_file.read_text() == "precious"


def test_an_unknown_mode_is_a_usage_error(stored):
    with pytest.raises(UsageError, match="create, resume, overwrite"):
        claim(stored, "append")


def test_import_json_and_decompose_refuse_through_the_same_rule(stored, tmp_path):
    from analysis.geometry.decompose import decompose_store
    from store.conversions.import_json import import_json

    legacy = tmp_path / "multi_pass.json"
    legacy.write_text("[]")  # refused before it is read
    with pytest.raises(StoreConflict, match="already exists; pass --overwrite"):
        import_json(legacy, store=stored)
    out, _ = decompose_store(stored, top_k=2, cp_rank=1)
    with pytest.raises(StoreConflict, match="other settings"):
        decompose_store(stored, top_k=3, cp_rank=1, out=out)
    assert decompose_store(stored, top_k=3, cp_rank=1, out=out, force=True) == (out, False)
