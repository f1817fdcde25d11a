"""sweep: several pairs, one store each, a manifest of outcomes, failures recorded and passed over."""

from __future__ import annotations

import csv

from capture.pipeline.sweep import MANIFEST
from cli import main
from store.verify import verify_store


def test_sweep_records_each_pair_and_resumes(tiny_pair, tmp_path, capsys):
    args = ["sweep", "--pair", "tiny,no-such-pair,gpt2", "--store-dir", str(tmp_path), "--cache-dir",
            str(tiny_pair[2]), "--prompt", "hello there", "--quiet"]
    assert main(args) == 1  # some pairs failed, the others were captured
    rows = list(csv.DictReader((tmp_path / MANIFEST).open()))
    assert [(r["pair"], r["status"]) for r in rows] == [("tiny", "success"), ("no-such-pair", "failed"),
                                                          ("gpt2", "failed")]
    assert "unknown model pair 'no-such-pair'" in rows[1]["reason"]
    assert "could not be fetched from the model hub" in rows[2]["reason"]  # offline: says how to use a local copy
    assert verify_store(rows[0]["store"]) == []
    assert "1 captured, 0 skipped (complete), 2 failed" in capsys.readouterr().out
    assert main([*args[:2], "tiny", *args[3:]]) == 0  # rerun: the complete store is skipped
    rows = list(csv.DictReader((tmp_path / MANIFEST).open()))
    assert [(r["pair"], r["status"]) for r in rows] == [("tiny", "skipped")]


def test_sweep_on_a_cluster(tiny_pair, tmp_path, capsys):
    args = ["sweep", "--pair", "tiny,no-such-pair", "--store-dir", str(tmp_path), "--cache-dir", str(tiny_pair[2]),
            "--prompt", "hello there", "--quiet", "--local-cluster", "2"]
    assert main(args) == 1
    rows = list(csv.DictReader((tmp_path / MANIFEST).open()))
    assert [(r["pair"], r["status"]) for r in rows] == [("tiny", "success"), ("no-such-pair", "failed")]
    assert verify_store(rows[0]["store"]) == []
    assert "capturing on dask.distributed" in capsys.readouterr().err
