"""verify: a sound store passes; each kind of damage is found and named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from cli import main
from store.testing import write_tiny_store
from store.verify import verify_store
from store.writer import consolidate


@pytest.fixture
def store(tmp_path):
    return write_tiny_store(tmp_path / "s.zarr", lengths=(5, 3, 4))


def _group(path):
    return zarr.open_group(str(path), mode="r+", use_consolidated=False)


def test_sound_store_passes(store, capsys):
    assert verify_store(store) == []
    assert main(["verify", str(store)]) == 0 and "OK" in capsys.readouterr().out


@pytest.mark.parametrize(("damage", "message"), [
    (lambda g: g["resid"].__setitem__((1, 0, 2, 1), np.nan), "resid pass BS prompt 0: NaN at real token 1"),
    (lambda g: g["resid"].__setitem__((0, 1, 0, 4), 1.0), "resid pass BB prompt 1: values on padding positions"),
    (lambda g: g["final"].__setitem__((3, 2, 0, 0), np.inf), "final has infinite values, e.g. at"),
    (lambda g: g["done"].__setitem__((2, 1), False), "1 of 12 pass x prompt regions not done (resume the capture)"),
    (lambda g: g.attrs.update(store_dtype="float16"), "attribute store_dtype is float16 but resid is float32"),
    (lambda g: g.attrs.update(resdiff_format_version=99), "newer than this resdiff reads"),
])
def test_damage_is_found(store, damage, message, capsys):
    damage(_group(store))
    consolidate(store)
    problems = verify_store(store)
    assert any(message in p for p in problems), problems
    assert main(["verify", str(store)]) == 1
    assert message in capsys.readouterr().out


def test_not_a_store(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["verify", str(tmp_path / "x")]) == 1
    assert "not a Zarr v3 store" in capsys.readouterr().out
    assert json.dumps(verify_store(tmp_path / "missing"))  # a message, not an exception


def test_captured_store_with_lens_statistics_passes(capture_store):
    assert verify_store(capture_store("gpt2", store_dtype="float16", track=["7"])) == []
