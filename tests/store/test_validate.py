"""Opening a store validates its metadata: every command refuses an edited or damaged field in one line."""

from __future__ import annotations

import json

import pytest
import zarr

from cli import main
from store.errors import StoreFormatError
from store.reader import open_store
from store.testing import fill_lens_statistics, write_tiny_store
from store.verify import verify_store
from store.writer import consolidate

COMMANDS = [["info"], ["verify"], ["report"], ["factorial"], ["diff-lens"], ["decompose"],
            ["loader-stats", "--layer", "1"], ["export-json"], ["export-netcdf", "OUT.nc"], ["plot"]]


@pytest.fixture
def store(tmp_path):
    return fill_lens_statistics(write_tiny_store(tmp_path / "s.zarr", lengths=(5, 3, 4)))


def _edit(path, name, index, value):
    zarr.open_group(str(path), mode="r+", use_consolidated=False)[name][index] = value


def _set_attr(path, **attrs):
    group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    group.attrs.update(attrs)
    consolidate(path)


@pytest.mark.parametrize(("value", "message"), [(0, "is 0, outside 1..5"), (-3, "is -3, outside 1..5"),
                                                (9, "is 9, outside 1..5"), (2, "is 2 but it has 3 stored token ids")])
def test_edited_lengths_are_refused(store, value, message):
    _edit(store, "n_tokens", 1, value)
    with pytest.raises(StoreFormatError, match=f"n_tokens of prompt .* {message}"):
        open_store(store)
    assert any("n_tokens" in p for p in verify_store(store))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_short_length_in_one_line(store, command, tmp_path, capsys):
    _edit(store, "n_tokens", 0, 2)
    args = [command[0], str(store), *[str(tmp_path / a) if a.endswith(".nc") else a for a in command[1:]]]
    code = main(args)
    out = capsys.readouterr()
    text = (out.err + out.out).strip()
    assert code in (1, 2) and "n_tokens of prompt" in text, text
    if command[0] != "verify":
        assert code == 2 and out.err.count("\n") == 1


@pytest.mark.parametrize(("version", "message"), [
    (True, "is True, not an integer"), ("2", "is '2', not an integer"), (2.0, "is 2.0, not an integer"),
    (-1, "is -1, which no resdiff wrote"), (0, "is 0, which no resdiff wrote"), (99, "newer than this resdiff"),
])
def test_format_versions_that_are_not_readable_integers(store, version, message, capsys):
    _set_attr(store, resdiff_format_version=version)
    with pytest.raises(StoreFormatError, match=message):
        open_store(store)
    assert main(["report", str(store)]) == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("attrs", "message"), [
    ({"models": "base"}, "attribute 'models' is 'base', not a mapping"),
    ({"pass_plan": 3}, "attribute 'pass_plan' is 3, not a list"),
    ({"pass_plan": [7]}, "entry 0 of its attribute 'pass_plan'"),
    ({"capture_settings": [1]}, "attribute 'capture_settings' is [1], not a mapping"),
])
def test_wrong_typed_attributes_are_refused(store, attrs, message, capsys):
    _set_attr(store, **attrs)
    assert main(["info", str(store)]) == 2
    assert message in capsys.readouterr().err


def test_labels_outside_the_schema_are_refused(store):
    _edit(store, "model", 0, "xyz")
    with pytest.raises(StoreFormatError, match=r"model labels .* are not all 'base' or 'sft'"):
        open_store(store)


def test_a_store_killed_while_finishing_opens_silently_and_a_rerun_repairs_it(tmp_path, tiny_pair, recwarn):
    store = tmp_path / "s.zarr"
    args = ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--prompt", "Hi there."]
    assert main(args) == 0
    # what a resdiff before format 3 left when killed between completed_at and consolidation
    root = json.loads((store / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (store / "zarr.json").write_text(json.dumps(root))
    open_store(store).resid.sum().compute()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert any("no consolidated metadata" in p for p in verify_store(store))
    assert main(args) == 0
    assert json.loads((store / "zarr.json").read_text()).get("consolidated_metadata")
    assert verify_store(store) == []
