"""One helper for every output: written under a temporary name, renamed when complete."""

from __future__ import annotations

import pytest

from store.atomic import atomic_output


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "rows.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_directories_replace_directories(tmp_path):
    target = tmp_path / "out.zarr"
    (target / "old").mkdir(parents=True)
    with atomic_output(target) as tmp:
        (tmp / "new").mkdir(parents=True)
    assert [p.name for p in target.iterdir()] == ["new"]


def test_keep_existing_discards_ours_when_another_writer_finished_first(tmp_path):
    target = tmp_path / "pair"
    with atomic_output(target, unique=True, keep_existing=True) as first:
        first.mkdir()
        (first / "who").write_text("first")
        with atomic_output(target, unique=True, keep_existing=True) as second:
            assert second != first
            second.mkdir()
            (second / "who").write_text("second")
    assert (target / "who").read_text() == "second"  # the one that finished first is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair"]
