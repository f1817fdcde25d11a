"""Legacy YAML configs: every supported key, environment overrides, flags on top, end to end."""

from __future__ import annotations

import pytest

from capture.config import load_legacy_config
from cli import main
from store.errors import UsageError
from store.reader import open_store

CONFIG = """
residual_compare:
  base_model: {base}
  sft_model: {sft}
  tokenizer: null
  device: cpu
  dtype: fp16
  top_k: 5
  prompts:
    - "Why does ice float?"
  prompt_file: prompts.txt
  prompt_variants: [identity, base_prefixed]
  prompt_variant_options:
    base_prefixed: {{prefix: ">> "}}
    dual_channel: {{base_prefix: "B:\\\\n", order: sft_first}}
  tracked_token_ids: [7]
  tracked_token_strings: ["Ġthe"]
  interesting_token_map: {{eos: "<|end|>"}}
  model_kwargs: {{low_cpu_mem_usage: true, attn_implementation: eager}}
  tokenizer_kwargs: {{}}
  local_run: {{enabled: true, min_vram_gb: 23.5, require_gpu_name_substring: "4090"}}
  model_sweep: [{{name: qwen-0.5b, base: Qwen/Qwen2.5-0.5B, sft: Qwen/Qwen2.5-0.5B-Instruct}}]
  embedding_variants: [{{name: default, base: {{embedding_source: base}}, sft: {{embedding_source: sft}}}}]
  multi_pass:
    enabled: true
    runs:
      - {{name: BB, model: base}}
      - {{name: SS, model: sft, embedding_source: sft}}
      - {{name: BS, model: sft, embedding_source: base, unembedding_source: base}}
    pairwise_differences:
      - [BB, SS]
      - [BB, BS, named]
      - {{lhs: SS, rhs: BB, name: back}}
"""


@pytest.fixture
def config_file(tiny_pair, tmp_path):
    base, sft, _ = tiny_pair
    (tmp_path / "prompts.txt").write_text("Explain the moon landing.\nWrite a short Python function.\n")
    path = tmp_path / "dev_config.yaml"
    path.write_text(CONFIG.format(base=base, sft=sft))
    return path


def test_every_key_maps_to_settings(config_file, tiny_pair):
    fields, notes = load_legacy_config(config_file, environ={})
    assert fields["base"] == tiny_pair[0] and fields["sft"] == tiny_pair[1] and fields["model_pair"] is None
    assert fields["tokenizer"] == tiny_pair[1]  # legacy: a null tokenizer means the SFT model's
    assert fields["device"] == "cpu" and fields["dtype"] == "float16" and fields["top_k"] == 5
    assert fields["prompts"] == ["Why does ice float?"]
    assert fields["prompts_files"] == [str(config_file.parent / "prompts.txt")]
    assert fields["variants"] == ["identity", "base_prefixed"]
    assert fields["variant_options"]["base_prefixed"] == {"prefix": ">> "}
    assert fields["variant_options"]["dual_channel"]["base_prefix"] == "B:\\n"  # a literal backslash-n, as in YAML
    assert fields["track"] == ["7", "Ġthe", "<|end|>"]
    assert fields["model_kwargs"] == {"low_cpu_mem_usage": True, "attn_implementation": "eager"}
    assert fields["passes"] == "BB=base:base:base,SS=sft:sft:sft,BS=sft:base:base"
    assert fields["pass_pairs"] == "BB-SS,named=BB-BS,back=SS-BB"
    assert any("local_run ignored" in n for n in notes)
    assert any("model_sweep entries usable as --pair NAME with this config: qwen-0.5b" in n for n in notes)
    sweep, sweep_notes = load_legacy_config(config_file, environ={}, model_pair="qwen-0.5b")
    assert any(n.endswith("--pair qwen-0.5b is the config's model_sweep entry 'qwen-0.5b'") for n in sweep_notes)
    assert (sweep["base"], sweep["sft"], sweep["tokenizer"]) == (
        "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    assert any("embedding_variants ignored because multi_pass is enabled" in n for n in notes)


def test_environment_overrides(config_file):
    env = {"RESIDUAL_DTYPE": " bf16 ", "RESIDUAL_DEVICE": "",
           "RESIDUAL_MODEL_KWARGS": '{"attn_implementation": "sdpa"}'}
    fields, _ = load_legacy_config(config_file, environ=env)
    assert fields["dtype"] == "bfloat16" and fields["device"] == "cpu"
    assert fields["model_kwargs"] == {"attn_implementation": "sdpa"}
    with pytest.raises(UsageError, match="RESIDUAL_MODEL_KWARGS must be a JSON object"):
        load_legacy_config(config_file, environ={"RESIDUAL_MODEL_KWARGS": "{nope"})


def test_bad_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("residual_compare:\n  base_modle: gpt2\n")
    with pytest.raises(UsageError, match=r"unknown key.*base_modle"):
        load_legacy_config(path, environ={})
    path.write_text("residual_compare:\n  multi_pass: {enabled: true, pairwise_differences: [[BB]]}\n")
    with pytest.raises(UsageError, match="must name a left and a right run"):
        load_legacy_config(path, environ={})
    with pytest.raises(UsageError, match="does not exist"):
        load_legacy_config(tmp_path / "missing.yaml", environ={})


def test_config_runs_end_to_end_with_flags_on_top(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESIDUAL_DTYPE", "float32")
    store = tmp_path / "c.zarr"
    assert main(["capture", "--config", str(config_file), "--store", str(store), "--quiet", "--top-k", "3"]) == 0
    assert "local_run ignored" in capsys.readouterr().err
    ds = open_store(store).sortby("prompt")  # source order (the store lays prompts out longest first)
    assert ds.attrs["model_dtype"] == "float32" and ds.sizes["k"] == 3
    assert list(ds.pass_.values) == ["BB", "SS", "BS"] and list(ds.unembedding.values) == ["base", "sft", "base"]
    assert list(ds.pair.values) == ["BB-SS", "named", "back"]
    assert ds.prompt_index.values.tolist() == [0, 0, 1, 1, 2, 2]  # file prompts first, then inline
    assert ds.prompt_text.values[1] == ">> Explain the moon landing."
    assert ds.prompt_text.values[4] == "Why does ice float?"
    assert len(ds.tracked_id) == 3


SINGLE_PASS = """
residual_compare:
  base_model: {base}
  sft_model: {sft}
  device: cpu
  top_k: 3
  prompts: ["Why does ice float?", "Explain the moon landing."]
  prompt_variants: [identity, mirror_halves]
  embedding_variants:
    - {{name: default}}
    - {{name: sft_unembed, base: {{embedding_source: self, unembedding_source: sft}}, sft: {{embedding_source: base}}}}
"""


def test_single_pass_config_exports_format_1(tiny_pair, tmp_path):
    import json

    base, sft, _ = tiny_pair
    config = tmp_path / "prod.yaml"
    config.write_text(SINGLE_PASS.format(base=base, sft=sft))
    fields, _ = load_legacy_config(config, environ={})
    assert fields["passes"] == ("default.base=base:base:base,default.sft=sft:sft:sft,"
                                "sft_unembed.base=base:base:sft,sft_unembed.sft=sft:base:sft")
    assert fields["pass_pairs"] == "default=default.base-default.sft,sft_unembed=sft_unembed.base-sft_unembed.sft"
    store = tmp_path / "f1.zarr"
    assert main(["capture", "--config", str(config), "--store", str(store), "--quiet", "--store-dtype", "float32"]) == 0
    assert main(["export-json", str(store), "--out", str(tmp_path / "out")]) == 0
    (path,) = (tmp_path / "out").glob("residual_compare_*.json")
    import re

    from store.location import sanitize_label

    assert re.fullmatch(rf"residual_compare_\d{{8}}_\d{{6}}_{re.escape(sanitize_label(sft))}\.json", path.name)
    records = json.loads(path.read_text())
    assert len(records) == 2 * 2 * 2  # prompts x prompt variants x embedding variants
    assert [(r["metadata"]["prompt_idx"], r["metadata"]["variant_name"], r["metadata"]["embedding_variant"])
            for r in records[:4]] == [(0, "identity", "default"), (0, "identity", "sft_unembed"),
                                      (0, "mirror_halves", "default"), (0, "mirror_halves", "sft_unembed")]
    first = records[1]
    assert list(first) == ["prompt", "tokens", "metadata", "swap_options", "layers"]
    assert first["swap_options"] == {"base": {"embedding_source": "base", "unembedding_source": "sft"},
                                     "sft": {"embedding_source": "base", "unembedding_source": "sft"}}
    ds = open_store(store)
    assert first["layers"]["0"]["0"]["kl_div"] == float(ds.kl.sel(pair="sft_unembed", lens="raw").values[0, 1, 0])
    assert len(first["layers"]["0"]["0"]) == 15 and not (tmp_path / "out" / "manifest_multi.csv").exists()


def test_sweep_entry_as_pair_on_the_command_line(tiny_pair, tmp_path):
    base, sft, _ = tiny_pair
    config = tmp_path / "sweep.yaml"
    config.write_text(f"residual_compare:\n  device: cpu\n  model_sweep:\n"
                      f"    - {{name: mine, base_model: {base}, sft_model: {sft}, dtype: fp32}}\n")
    store = tmp_path / "m.zarr"
    assert main(["capture", "--config", str(config), "--pair", "mine", "--store", str(store), "--quiet",
                 "--no-lens", "--prompt", "hello"]) == 0
    ds = open_store(store)
    assert ds.attrs["models"]["base"]["ref"] == base and ds.attrs["models"]["sft"]["ref"] == sft
