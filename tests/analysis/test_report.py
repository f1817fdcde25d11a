"""The report command end to end: tables, hotspots, tracked changes and exports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from analysis import open_store, pair_metrics, summarize_over
from cli import main


@pytest.fixture(scope="module")
def store_path(capture_store):
    return capture_store("llama", store_dtype="float16", track=["7", "40"])


def test_report_tables_and_exports(store_path, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert main(["report", str(store_path), "--metric", "cosine_sim", "--pair", "BB-SS", "--top-n", "3",
                 "--lens", "norm", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    summary = summarize_over(pair_metrics(open_store(store_path)).cosine_sim.sel(pair="BB-SS"), "layer").compute()
    assert "cosine_sim by layer (pair BB-SS, lens norm):" in text
    for layer in range(summary.sizes["layer"]):
        assert f"{float(summary['mean'][layer]):.4f}" in text
    rows = list(csv.DictReader(out.open()))
    spots = [r for r in rows if r["metric"] == "cosine_sim"]
    assert [int(r["rank"]) for r in spots] == [1, 2, 3]
    assert abs(float(spots[0]["value"])) >= abs(float(spots[-1]["value"]))
    changes = [r for r in rows if r.get("type") == "logit_change"]
    assert all(abs(float(r["shift"])) >= 0.5 for r in changes)  # the legacy export crashed on these rows
    assert "tracked logit changes" in text


def test_report_runs_and_json_export(store_path, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["report", str(store_path), "--record-type", "runs", "--metric", "norm", "--metric", "entropy",
                 "--pass", "SS", "--axis", "token", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    assert "norm by token (pass SS, lens raw):" in text and "entropy by token" in text
    rows = json.loads(out.read_text())
    assert {r["metric"] for r in rows} == {"norm", "entropy"} and all(r["pass_"] == "SS" for r in rows)
    assert np.isfinite([r["value"] for r in rows]).all()


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "nrom"], "unknown pairwise metric 'nrom'"),
    (["--pair", "XX-YY"], "unknown pair 'XX-YY'"),
    (["--record-type", "runs", "--pass", "QQ"], "unknown pass 'QQ'"),
    (["--export", "x.parquet"], "--export needs a .csv or .json path"),
])
def test_report_errors(store_path, args, message, capsys):
    assert main(["report", str(store_path), *args]) == 2
    assert message in capsys.readouterr().err
