"""import-json: legacy files back into (statistics-only) stores, read streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest

import store.conversions.import_json as imp
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from cli import main
from store.errors import UsageError
from store.reader import open_store
from tests.helpers import PROMPTS


def test_export_then_import_round_trips_the_statistics(make_model, tmp_path, monkeypatch):
    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:3], store=str(tmp_path / "s"),
                               store_dtype="float32", device="cpu", top_k=3, track=["7"])
    original = open_store(run_capture(settings, log=lambda *a: None, progress=False)).sortby("prompt")
    assert main(["export-json", str(tmp_path / "s"), "--out", str(tmp_path / "out")]) == 0
    (exported,) = (tmp_path / "out").rglob("multi_pass_*.json")
    monkeypatch.setattr(imp, "READ_BYTES", 1000)  # many small reads: records span read boundaries
    assert main(["import-json", str(exported), "--store", str(tmp_path / "back.zarr")]) == 0
    back = open_store(tmp_path / "back.zarr")
    assert back.attrs["statistics_only"] and "resid" not in back and back.attrs["legacy_format"] == 2
    assert back.layer.values.tolist() == list(range(1, original.sizes["layer"]))
    assert list(back.pass_.values) == list(original.pass_.values) and list(back.pair.values) == list(original.pair)
    assert bool(back.done.all()) and bool(back.lens_done.all())
    assert back.token_str.values.tolist() == original.token_str.values.tolist()
    n_layers = original.sizes["layer"] - 1
    for name in ("entropy", "kl", "tracked_logit", "topk_logit", "rise_shift", "fall_shift", "topk_id", "rise_id"):
        raw = original[name].sel(lens="raw").values
        normed = original[name].sel(lens="norm").values
        expected = np.concatenate([raw[:, :, 1:n_layers], normed[:, :, n_layers:]], axis=2)
        got = back[name].sel(lens="raw").values
        if name.endswith(("logit", "shift")) and name != "tracked_logit":
            # values were rounded to 6 decimals by the export (and are float32 again here)
            np.testing.assert_allclose(got, expected, atol=6e-7, rtol=0, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True, err_msg=name)
    # Geometric fields come through as stored values.
    record = next(imp.iter_json_array(exported))
    assert float(back.norm.sel(pass_="SS").values[0, 0, 1]) == pytest.approx(
        record["runs"][3]["layers"]["0"]["1"]["norm"], rel=1e-6)
    assert float(back.cosine_sim.sel(pair="BB-SS").values[0, n_layers - 1, 0]) == pytest.approx(
        record["pairwise"][2]["layers"][str(n_layers - 1)]["0"]["cosine_sim"], rel=1e-6)


def _format1_record(prompt_idx: int, variant: str) -> dict:
    def position(t, scale):
        return {"token": f"t{t}", "top_k_increased": {"indices": [3, 1], "values": [0.5 * scale, 0.25]},
                "top_k_decreased": {"indices": [0, 2], "values": [-0.75, -0.5]}, "entropy_base": 1.0 + t,
                "entropy_sft": 2.0 + t, "kl_div": 0.1 * scale, "tracked_token_logits": {"5": {"base": 1.5, "sft": 2.5}},
                "cosine_sim": 0.9, "norm_base": 3.0, "norm_sft": 4.0, "norm_diff": 1.0, "base_cosine_prev": 0.8,
                "base_norm_delta": 0.1, "sft_cosine_prev": 0.7, "sft_norm_delta": 0.2}

    return {"prompt": f"p{prompt_idx}", "tokens": ["t0", "t1"],
            "metadata": {"prompt_idx": prompt_idx, "variant_name": "identity", "embedding_variant": variant},
            "swap_options": {"base": {"embedding_source": "base", "unembedding_source": "base"},
                             "sft": {"embedding_source": "base" if variant == "swap" else "sft",
                                     "unembedding_source": "sft"}},
            "layers": {str(k): {str(t): position(t, k + 1) for t in range(2)} for k in range(3)}}


def test_format1_file(tmp_path):
    records = [_format1_record(i, v) for i in range(2) for v in ("default", "swap")]
    path = tmp_path / "residual_compare_20251127_000000_x.json"
    path.write_text(json.dumps(records, indent=2))
    back = open_store(imp.import_json(path))
    assert back.attrs["legacy_format"] == 1
    assert list(back.pass_.values) == ["default.base", "default.sft", "swap.base", "swap.sft"]
    assert list(back.pair.values) == ["default", "swap"] and list(back.left.values) == ["default.base", "swap.base"]
    assert list(back.embedding.values) == ["base", "sft", "base", "base"]
    assert back.sizes["prompt"] == 2 and "topk_id" not in back
    np.testing.assert_allclose(back.kl.sel(pair="swap", lens="raw").values[1], [[0.1, 0.1], [0.2, 0.2], [0.3, 0.3]])
    np.testing.assert_allclose(back.entropy.sel(pass_="swap.sft", lens="raw").values[0, 2], [2.0, 3.0])
    assert back.rise_id.sel(pair="default").values[0, 0, 0, 1].tolist() == [3, 1]
    assert back.tracked_logit.sel(pass_="default.sft").values[0, 0, 0, 1, 0] == 2.5
    assert float(back.norm_delta.sel(pass_="default.base").values[1, 1, 1]) == pytest.approx(0.1)


def test_bad_files(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('[{"a": 1}, {"b": ')
    with pytest.raises(UsageError, match="truncated"):
        list(imp.iter_json_array(path))
    path.write_text('{"not": "a list"}')
    with pytest.raises(UsageError, match="must be a JSON array"):
        list(imp.iter_json_array(path))
    path.write_text('[{"prompt": "x"}]')
    with pytest.raises(UsageError, match="not a legacy results file"):
        imp.import_json(path)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()


def test_overwrite_never_deletes_a_directory_that_is_not_a_store(tmp_path):
    from store.errors import StoreFormatError

    path = tmp_path / "residual_compare_20251127_000000_x.json"
    path.write_text(json.dumps([_format1_record(0, "default")], indent=2))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(StoreFormatError, match="not a Zarr store, so it was not removed"):
        imp.import_json(path, store=precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "precious.partial").exists()


def test_a_report_on_an_imported_store_names_its_stored_tokens(tmp_path):
    """A statistics-only store has token pieces, no ids: the report's tables show the pieces (it crashed)."""
    from analysis.report.text import build_report

    records = [_format1_record(i, v) for i in range(2) for v in ("default", "swap")]
    path = tmp_path / "residual_compare_20251127_000000_x.json"
    path.write_text(json.dumps(records))
    text, rows = build_report(open_store(imp.import_json(path)), lens="raw", top_n=2)
    spots = [row for row in rows if row["type"] == "hotspot"]
    assert spots and {row["token"] for row in spots} <= {"t0", "t1"} and " t0 " in text


def test_massive_positions_of_an_imported_store_come_from_its_stored_norms(tmp_path):
    from analysis.geometry.outliers import massive_positions, norm_ratio

    records = [_format1_record(i, v) for i in range(2) for v in ("default", "swap")]
    path = tmp_path / "residual_compare_20251127_000000_x.json"
    path.write_text(json.dumps(records))
    ds = open_store(imp.import_json(path))
    norm = ds.norm.values.astype(np.float64)  # (pass, prompt, layer, token), no residuals to take them from
    want = norm / np.median(norm, axis=-1, keepdims=True)
    np.testing.assert_allclose(norm_ratio(ds).values, want, rtol=1e-6)
    np.testing.assert_allclose(massive_positions(ds).peak_ratio.values, want.max(axis=(0, 2)), rtol=1e-6)
