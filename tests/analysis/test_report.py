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
    # Large initial weights: logits move by more than the 0.5 a tracked change needs.
    return capture_store("llama", store_dtype="float16", track=["7", "40"], model_overrides={"initializer_range": 0.5})


def test_report_tables_and_exports(store_path, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert main(["report", str(store_path), "--metric", "cosine_sim", "--pass-pair", "BB-SS", "--top-n", "3",
                 "--lens", "norm", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    summary = summarize_over(pair_metrics(open_store(store_path)).cosine_sim.sel(pair="BB-SS"), "layer").compute()
    assert "cosine_sim by layer (pair BB-SS):" in text  # a geometric metric: no lens in its title
    for layer in range(summary.sizes["layer"]):
        assert f"{float(summary['mean'][layer]):.4f}" in text
    rows = list(csv.DictReader(out.open()))
    spots = [r for r in rows if r["type"] == "hotspot" and r["metric"] == "cosine_sim"]
    assert [int(r["rank"]) for r in spots] == [1, 2, 3]
    per_layer = [r for r in rows if r["type"] == "summary"]
    assert [int(r["layer"]) for r in per_layer] == list(range(summary.sizes["layer"]))
    for r in per_layer:  # the table's mean, with its interval around it
        assert float(r["mean_low"]) <= float(r["mean"]) <= float(r["mean_high"])
        assert float(r["mean"]) == pytest.approx(float(summary["mean"][int(r["layer"])]), rel=1e-6)
    assert abs(float(spots[0]["value"])) >= abs(float(spots[-1]["value"]))
    changes = [r for r in rows if r.get("type") == "logit_change"]
    assert changes and all(abs(float(r["shift"])) >= 0.5 for r in changes)  # the legacy export crashed on these rows
    assert "tracked logit changes" in text


def test_report_runs_and_json_export(store_path, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["report", str(store_path), "--record-type", "runs", "--metric", "norm", "--metric", "entropy",
                 "--pass", "SS", "--axis", "token", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    assert "norm by token (pass SS):" in text and "entropy by token (pass SS, norm lens):" in text
    rows = json.loads(out.read_text())
    assert {r["metric"] for r in rows} == {"norm", "entropy"} and all(r["pass_"] == "SS" for r in rows)
    assert np.isfinite([r["value"] for r in rows if r["type"] == "hotspot"]).all()
    assert {r["type"] for r in rows} == {"hotspot", "summary"}
    # one type per column: a per-token summary's index is token_idx, as a hotspot's (parquet refused mixed types)
    parquet = tmp_path / "rows.parquet"
    assert main(["report", str(store_path), "--record-type", "runs", "--pass", "SS", "--axis", "token", "--export",
                 str(parquet)]) == 0
    import pandas as pd

    frame = pd.read_parquet(parquet)
    assert frame.loc[frame["type"] == "summary", "token_idx"].notna().all()


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "nrom"], "unknown pairwise metric 'nrom'"),
    (["--pass-pair", "XX-YY"], "unknown pair 'XX-YY'"),
    (["--record-type", "runs", "--pass", "QQ"], "unknown pass 'QQ'"),
    (["--export", "x.txt"], "--export needs a .csv, .json or .parquet path"),
])
def test_report_errors(store_path, args, message, capsys):
    assert main(["report", str(store_path), *args]) == 2
    assert message in capsys.readouterr().err


def test_seven_number_summaries_and_parquet(store_path, tmp_path, capsys):
    pd = pytest.importorskip("pandas")
    out = tmp_path / "rows.parquet"
    assert main(["report", str(store_path), "--metric", "norm_diff", "--top-n", "2", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    ds = open_store(store_path)
    resid = ds.resid.values.astype(np.float64)
    passes = list(ds.pass_.values)
    diff = np.linalg.norm(resid[passes.index("SS")] - resid[passes.index("BB")], axis=-1)  # (prompt, layer, token)
    per_prompt = [np.nanmean(diff[p, :, : int(n)]) for p, n in enumerate(ds.n_tokens.values)]
    q1, median, q3 = np.percentile(per_prompt, [25, 50, 75])
    want = [min(per_prompt), q1, median, q3, max(per_prompt), np.mean(per_prompt), np.std(per_prompt)]
    line = next(x for x in text.splitlines() if x.strip().startswith("BB-SS") and len(x.split()) == 8)
    np.testing.assert_allclose([float(v) for v in line.split()[1:]], want, rtol=1e-4, atol=1e-4)
    rows = pd.read_parquet(out)
    assert {"metric", "pair", "value", "type", "shift"} <= set(rows.columns)
    assert (rows["type"] == "logit_change").any() and rows["value"].notna().any()


@pytest.mark.parametrize("source", ["left", "right", "diff"])
def test_token_id_previews(store_path, source, capsys):
    assert main(["report", str(store_path), "--token-id", "7", "--logit-source", source, "--pass-pair", "BS-SS",
                 "--prompt-index", "1", "--top-n", "3", "--lens", "norm"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ds = open_store(store_path)
    logit = ds.tracked_logit.sel(lens="norm", prompt=1, tracked=0).values.astype(np.float64)  # (pass, layer, token)
    passes = list(ds.pass_.values)
    left, right = logit[passes.index("BS")], logit[passes.index("SS")]
    grid = {"left": left, "right": right, "diff": right - left}[source]
    start = next(i for i, x in enumerate(lines) if x.startswith(f"logit grid preview ({source}"))
    tokens = ds.token_str.sel(prompt=1).values  # --prompt names a prompt by its label (source position)
    for layer in range(3):
        cells = lines[start + 1 + layer].split(": ", 1)[1].split(", ")
        assert len(cells) == min(3, int(ds.n_tokens.sel(prompt=1)))
        for t, cell in enumerate(cells):
            piece, value = cell.rsplit(":", 1)
            assert piece == tokens[t] and abs(float(value) - grid[layer, t]) <= 6e-4
    ids = ds.rise_id.sel(pair="BS-SS", lens="norm", prompt=1).values
    shifts = ds.rise_shift.sel(pair="BS-SS", lens="norm", prompt=1).values
    start = next(i for i, x in enumerate(lines) if x.startswith("top-k membership (increase"))
    for layer in range(3):
        want = [f"{tokens[t]}:{shifts[layer, t][list(ids[layer, t]).index(7)]:.3f}"
                for t in range(min(3, int(ds.n_tokens.values[1]))) if 7 in ids[layer, t]]
        assert lines[start + 1 + layer] == f"  L{layer}: " + (", ".join(want) if want else "-")


def test_token_id_needs_pairwise(store_path, capsys):
    assert main(["report", str(store_path), "--record-type", "runs", "--token-id", "7"]) == 2
    assert "--token-id works with --record-type pairwise" in capsys.readouterr().err
