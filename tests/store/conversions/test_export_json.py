"""export-json against the legacy record computed independently, in plain float64, from the
models' own hidden_states and the formulas of section 1 of legacy-format.md."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from cli import main
from tests.helpers import PROMPTS, load

K = 4
TRACK = ["Ġthe", "7"]


def _close(a, b, rel=1e-5, abs_=1e-6):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


def legacy_records(base_dir, sft_dir, tokenizer_dir, texts, tracked_ids):
    """The format-2 records, written plainly: batch of 1, no padding, raw lens, float64 statistics."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    models = {"base": load(base_dir), "sft": load(sft_dir)}
    heads = {k: m.get_output_embeddings().weight.detach().double().numpy() for k, m in models.items()}
    plan = [("BB", "base", "base"), ("BS", "sft", "base"), ("SB", "base", "sft"), ("SS", "sft", "sft")]
    records = []
    for idx, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        tokens = tok.convert_ids_to_tokens(ids)
        states = {}
        for name, llm, emb in plan:
            with torch.no_grad():
                embeds = models[emb].get_input_embeddings()(torch.tensor([ids]))
                hidden = models[llm](inputs_embeds=embeds, output_hidden_states=True).hidden_states
            states[name] = [h[0].double().numpy() for h in hidden]
        records.append({"idx": idx, "text": text, "tokens": tokens, "states": states, "plan": plan, "heads": heads,
                        "tracked": tracked_ids})
    return records


def logits(rec, name, key, t):
    unembedding = {n: llm for n, llm, _ in rec["plan"]}[name]  # default passes read out with their LLM's head
    return rec["heads"][unembedding] @ rec["states"][name][key + 1][t]


def log_softmax(z):
    m = z.max()
    return z - (m + np.log(np.exp(z - m).sum()))


def check_topk(got, z, k, descending=True):
    order = np.argsort(-z if descending else z)[:k]
    assert len(got["indices"]) == k
    # The exported ids must be the true top-k (up to float32 near-ties), values rounded to 6 decimals.
    assert np.allclose(np.sort(z[got["indices"]]), np.sort(z[order]), rtol=1e-5, atol=2e-6)
    for i, v in zip(got["indices"], got["values"], strict=True):
        assert v == round(v, 6) and _close(v, z[i], abs_=2e-6)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_export_matches_independent_legacy_computation(arch, make_model, tokenizer_dir, tmp_path):
    base_dir, sft_dir = make_model(arch, seed=0), make_model(arch, seed=1)
    texts = PROMPTS[:2]
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=texts, store=str(tmp_path / "s.zarr"),
                               store_dtype="float32", device="cpu", top_k=K, track=TRACK)
    run_capture(settings, log=lambda *a: None, progress=False)
    assert main(["export-json", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").rglob("multi_pass_*.json")
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2)  # the legacy layout, byte for byte (indent 2, ASCII escapes)
    from transformers import AutoTokenizer

    tracked = sorted({7, AutoTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids("Ġthe")})
    refs = legacy_records(base_dir, sft_dir, tokenizer_dir, texts, tracked)
    assert len(data) == len(refs)
    for record, ref in zip(data, refs, strict=True):
        assert list(record) == ["format_version", "prompt", "tokens", "metadata", "runs", "pairwise"]
        assert record["format_version"] == 2 and record["prompt"] == ref["text"] and record["tokens"] == ref["tokens"]
        assert record["metadata"] == {"prompt_idx": ref["idx"], "variant_name": "identity",
                                      "embedding_variant": "multi_pass", "multi_pass": True}
        n_layers = len(ref["states"]["BB"]) - 1
        assert [r["name"] for r in record["runs"]] == ["BB", "BS", "SB", "SS"]
        for run in record["runs"]:
            name = run["name"]
            assert list(run) == ["name", "model", "embedding_source", "unembedding_source", "layers", "metadata"]
            assert run["metadata"] == {"prompt_idx": ref["idx"], "variant_name": "identity",
                                       "embedding_variant": "multi_pass", "run_name": name}
            assert list(run["layers"]) == [str(k) for k in range(n_layers)]
            for key in range(n_layers):
                cur_states, prev_states = ref["states"][name][key + 1], ref["states"][name][key]
                assert list(run["layers"][str(key)]) == [str(t) for t in range(len(ref["tokens"]))]
                for t, pos in enumerate(run["layers"][str(key)].values()):
                    assert list(pos) == ["token", "entropy", "norm", "norm_delta", "cosine_prev", "top_k_logits",
                                         "tracked_token_logits"]
                    z = logits(ref, name, key, t)
                    lp = log_softmax(z)
                    h, h_prev = cur_states[t], prev_states[t]
                    assert pos["token"] == ref["tokens"][t]
                    assert _close(pos["entropy"], -(np.exp(lp) * lp).sum())
                    assert _close(pos["norm"], np.linalg.norm(h))
                    assert _close(pos["norm_delta"], np.linalg.norm(h) - np.linalg.norm(h_prev), abs_=1e-5)
                    cos = h @ h_prev / max(np.linalg.norm(h) * np.linalg.norm(h_prev), 1e-8)
                    assert _close(pos["cosine_prev"], cos)
                    check_topk(pos["top_k_logits"], z, K)
                    assert list(pos["tracked_token_logits"]) == [str(i) for i in tracked]
                    for tid, value in pos["tracked_token_logits"].items():
                        assert _close(value, z[int(tid)])
        pairs = [(p["name"], p["base_run"], p["sft_run"]) for p in record["pairwise"]]
        assert pairs == [("BB-BS", "BB", "BS"), ("BB-SB", "BB", "SB"), ("BB-SS", "BB", "SS"),
                         ("BS-SB", "BS", "SB"), ("BS-SS", "BS", "SS"), ("SB-SS", "SB", "SS")]
        for pair in record["pairwise"]:
            left, right = pair["base_run"], pair["sft_run"]
            assert list(pair) == ["name", "base_run", "sft_run", "prompt", "tokens", "metadata", "swap_options",
                                  "layers"]
            assert pair["metadata"] == {"prompt_idx": ref["idx"], "variant_name": "identity",
                                        "embedding_variant": "multi_pass", "base_run": left, "sft_run": right,
                                        "pair_name": pair["name"]}
            emb = {n: e for n, _, e in ref["plan"]}
            unemb = {n: m for n, m, _ in ref["plan"]}
            assert pair["swap_options"] == {
                "base": {"embedding_source": emb[left], "unembedding_source": unemb[left]},
                "sft": {"embedding_source": emb[right], "unembedding_source": unemb[right]}}
            for key in range(n_layers):
                for t, pos in enumerate(pair["layers"][str(key)].values()):
                    assert list(pos) == ["token", "top_k_increased", "top_k_decreased", "entropy_base", "entropy_sft",
                                         "kl_div", "tracked_token_logits", "cosine_sim", "norm_base", "norm_sft",
                                         "norm_diff", "base_cosine_prev", "base_norm_delta", "sft_cosine_prev",
                                         "sft_norm_delta"]
                    z_l, z_r = logits(ref, left, key, t), logits(ref, right, key, t)
                    lp_l, lp_r = log_softmax(z_l), log_softmax(z_r)
                    h_l, h_r = ref["states"][left][key + 1][t], ref["states"][right][key + 1][t]
                    check_topk(pos["top_k_increased"], z_r - z_l, K)
                    check_topk(pos["top_k_decreased"], z_r - z_l, K, descending=False)
                    assert _close(pos["entropy_base"], -(np.exp(lp_l) * lp_l).sum())
                    assert _close(pos["entropy_sft"], -(np.exp(lp_r) * lp_r).sum())
                    assert _close(pos["kl_div"], (np.exp(lp_r) * (lp_r - lp_l)).sum(), abs_=5e-8)
                    for tid, value in pos["tracked_token_logits"].items():
                        assert _close(value["base"], z_l[int(tid)]) and _close(value["sft"], z_r[int(tid)])
                    cos = h_l @ h_r / max(np.linalg.norm(h_l) * np.linalg.norm(h_r), 1e-8)
                    assert _close(pos["cosine_sim"], cos)
                    assert _close(pos["norm_diff"], np.linalg.norm(h_l - h_r), abs_=1e-5)
    meta = json.loads(next((tmp_path / "out").rglob("*.meta.json")).read_text())
    assert list(meta) == ["timestamp", "base_model", "sft_model", "prompts_processed", "prompt_variants",
                          "results_serialized", "multi_pass_runs", "multi_pass_pairwise", "notes"]
    assert meta["results_serialized"] == 2 and meta["multi_pass_runs"] == ["BB", "BS", "SB", "SS"]
    manifest = (tmp_path / "out" / "manifest_multi.csv").read_text().splitlines()
    assert manifest[0] == "timestamp,entry,prompt_count,prompt_variants,multi_pass,json_path,log_path"
    assert manifest[1].split(",")[2:5] == ["2", "identity", "true"]


def test_export_refuses_stores_without_statistics(make_model, tmp_path, capsys):
    base_dir, sft_dir = make_model("llama", seed=0), make_model("llama", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:1], store=str(tmp_path / "s"),
                               device="cpu", lens=False)
    run_capture(settings, log=lambda *a: None, progress=False)
    assert main(["export-json", str(tmp_path / "s"), "--out", str(tmp_path / "o")]) == 2
    assert "recapture without --no-lens" in capsys.readouterr().err
    assert not list((tmp_path / "o").rglob("*.json"))


def test_norm_lens_export_uses_the_standard_lens_at_every_key(make_model, tmp_path):
    from store.reader import open_store

    base_dir, sft_dir = make_model("llama", seed=0), make_model("llama", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:1], store=str(tmp_path / "s"),
                               store_dtype="float32", device="cpu", top_k=2)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False))
    assert main(["export-json", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--lens", "norm"]) == 0
    (path,) = (tmp_path / "o").rglob("multi_pass_*.json")
    record = json.loads(path.read_text())[0]
    for key in range(ds.sizes["layer"] - 1):
        got = record["runs"][1]["layers"][str(key)]["0"]["entropy"]
        assert got == float(ds.entropy.sel(pass_="BS", lens="norm").values[0, key + 1, 0])
        raw = float(ds.entropy.sel(pass_="BS", lens="raw").values[0, key + 1, 0])
        assert key == ds.sizes["layer"] - 2 or got != raw


@pytest.mark.parametrize("tracked", [TRACK, []])
def test_fast_text_is_json_dumps_of_the_records_byte_for_byte(make_model, tokenizer_dir, tmp_path, tracked):
    from store.conversions.legacy_records import prompt_records, prompt_text
    from store.reader import open_store

    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:3], store=str(tmp_path / "s"),
                               device="cpu", top_k=3, track=tracked)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False)).load()
    # Values json writes specially or that round() and numpy round differently must come out the same too.
    ds["entropy"][0, 0, 1, 0] = np.nan
    ds["kl"][1, 0, 2, 1] = np.inf
    ds["topk_logit"][0, 0, 1, 0, 0] = -np.inf
    ds["rise_shift"][0, 0, 1, 0, 1] = 2.675  # round(2.675, 2) style ties: Python's round is the reference
    for prompt in range(ds.sizes["prompt"]):
        assert prompt_text(ds, prompt) == json.dumps(prompt_records(ds, prompt), indent=2)
        assert prompt_text(ds, prompt, "norm") == json.dumps(prompt_records(ds, prompt, "norm"), indent=2)
        indented = "  " + json.dumps(prompt_records(ds, prompt), indent=2).replace("\n", "\n  ")
        assert prompt_text(ds, prompt, indent=2) == indented
