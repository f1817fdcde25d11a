"""``capture --plan`` and ``--max-memory``: the prediction against measured peaks, from configs alone."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from cli import main
from tests.helpers import PROMPTS

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "capture_memory.py"
_spec = importlib.util.spec_from_file_location("capture_memory", BENCH)
capture_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(capture_memory)


def _small_pair(root: Path, arch: str, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A pair big enough that weights, not the interpreter, are most of the model-dependent memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    if arch == "gpt2":  # tied embedding, learned positions
        config = GPT2Config(n_layer=4, n_embd=384, n_head=6, vocab_size=32000, n_positions=256)
    else:  # untied head, gated MLP, grouped-query attention
        config = LlamaConfig(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, num_key_value_heads=2,
                             intermediate_size=1536, vocab_size=32000, max_position_embeddings=256)
    dirs = root / f"{arch}-base", root / f"{arch}-sft"
    for seed, path in enumerate(dirs):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "lens"), [("tiny", True), ("gpt2", True), ("gpt2", False), ("llama", True),
                                            ("llama", False)])
def test_predicted_peak_within_20_percent_of_measured(arch, lens, tiny_pair, tokenizer_dir, tmp_path):
    base, sft = tiny_pair[:2] if arch == "tiny" else _small_pair(tmp_path, arch, tokenizer_dir)
    report = capture_memory.measure(base, sft, tmp_path / "s.zarr", lens=lens, prompts="dev", batch_size=4)
    error = report["predicted"] / report["measured"] - 1
    assert abs(error) <= 0.2, json.dumps(report, indent=1)
    # The model-dependent part is predicted too, not only the interpreter's share.
    above = report["measured"] - report["baseline"]
    if arch != "tiny":
        assert abs(report["predicted"] - report["measured"]) < 0.5 * above, json.dumps(report, indent=1)


def _corrupt_weights(src: Path, dst: Path) -> Path:
    """A copy whose tensor bytes are gone but whose safetensors header is intact."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    file.write_bytes(raw[:8 + length])
    return dst


def test_plan_reads_configs_only(make_model, tmp_path, capsys):
    base = _corrupt_weights(make_model("llama", 0), tmp_path / "base")
    sft = _corrupt_weights(make_model("llama", 1), tmp_path / "sft")
    store = tmp_path / "s.zarr"
    args = ["capture", "--base", str(base), "--sft", str(sft), "--store", str(store), "--quiet", "--batch-size", "2"]
    assert main([*args, *[a for p in PROMPTS for a in ("--prompt", p)], "--plan"]) == 0
    out = capsys.readouterr().out
    assert "1. base model, passes BB, SB" in out and "2. sft model, passes BS, SS" in out
    assert "3. lens statistics" in out and f"store: {store}" in out and "predicted peak process memory" in out
    assert not store.exists()
    assert main([*args, "--prompt", "hello"]) == 2  # the real capture does read the (broken) weights
    assert "cannot load model" in capsys.readouterr().err


def test_max_memory_refuses_before_loading(make_model, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    args = ["capture", "--base", str(make_model("llama", 0)), "--sft", str(make_model("llama", 1)), "--store",
            str(store), "--quiet", "--prompt", "hello world"]
    assert main([*args, "--max-memory", "100MB"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: capture would need about ") and "more than --max-memory 100MB" in err
    assert "lower --batch-size" in err and err.count("\n") == 1 and not store.exists()
    assert main([*args, "--max-memory", "64GB"]) == 0 and store.exists()


@pytest.mark.parametrize(("attention", "n_tokens", "batches"),
                         [("sdpa", 100, (4, 32)), ("sdpa", 300, (2, 12)), ("eager", 200, (2, 12))])
def test_forward_activations_within_20_percent_of_the_traced_peak(attention, n_tokens, batches):
    """One compute batch as the runner runs it (forward, non-finite check, padding made NaN): the CPU
    allocator's traced peak against the plan's ``forward_activations``, at two batch sizes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from capture.pipeline.runner import _first_non_finite, forward_residuals
    from capture.plan.budget import ModelFootprint, forward_activations
    from capture.plan.memory_trace import traced_peak

    shape = dict(num_hidden_layers=3, hidden_size=256, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=768, vocab_size=1000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), attn_implementation=attention).eval()
    warm = torch.randint(0, 1000, (1, 4))
    forward_residuals(model, model.get_input_embeddings(), warm, torch.ones_like(warm))  # first-call buffers
    footprint = ModelFootprint(params=0, embedding=0, head=0, mapped=True, n_layers=3, hidden=256, vocab=1000,
                               ffn=768, n_heads=8, fused_attention=attention != "eager")
    for batch in batches:
        ids = torch.randint(0, 1000, (batch, n_tokens))
        mask = torch.ones_like(ids)
        mask[0, n_tokens - 7:] = 0  # one padded row, as in a ragged batch

        def one_batch(ids=ids, mask=mask):
            with torch.inference_mode():
                resid, final = forward_residuals(model, model.get_input_embeddings(), ids, mask)
                _first_non_finite(resid, mask.bool())
                resid.masked_fill_(~mask.bool()[:, None, :, None], float("nan"))
                final.masked_fill_(~mask.bool()[:, :, None], float("nan"))

        peak = traced_peak(one_batch)
        predicted = forward_activations(footprint, batch, n_tokens, 4, 4, on_cpu=True)
        assert abs(predicted / peak - 1) <= 0.2, (attention, n_tokens, batch, predicted, peak)


def test_the_footprint_knows_fused_attention(make_model):
    from capture.plan.budget import model_footprint

    assert model_footprint(str(make_model("llama")), "float32", "cpu").fused_attention
