"""Pass semantics, checked against transformers run directly (no resdiff code in the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.models.loading import load_input_embedding
from capture.pipeline.job import run_capture
from capture.plan.passes import DEFAULT_PASSES, parse_passes, schedule
from capture.settings import CaptureSettings
from store.errors import UsageError
from store.reader import open_store
from tests.helpers import ARCHS, PROMPTS, load


def _capture(tmp_path, base, sft, **kw):
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=PROMPTS, store=str(tmp_path / "s.zarr"),
                               store_dtype="float32", device="cpu", batch_size=3, **kw)
    # Sorted by label: prompt i is PROMPTS[i] (the store lays prompts out longest first).
    return open_store(run_capture(settings, log=lambda *a: None, progress=False)).sortby("prompt")


def _reference(llm_dir, embedding_dir, tokenizer_dir, text):
    """hidden_states of ``llm`` run on ``embedding``'s input embeddings, per prompt, no padding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    llm, donor = load(llm_dir), load(embedding_dir)
    with torch.no_grad():
        embeds = donor.get_input_embeddings()(ids)
        return llm(inputs_embeds=embeds, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma"])
def test_cross_passes_equal_direct_runs(arch, make_model, tokenizer_dir, tmp_path):
    base, sft = make_model(arch, seed=0), make_model(arch, seed=1)
    ds = _capture(tmp_path, base, sft)
    n_layers = ds.sizes["layer"] - 1
    for name, llm, emb in (("BS", sft, base), ("SB", base, sft), ("BB", base, base), ("SS", sft, sft)):
        for prompt, text in enumerate(PROMPTS):
            hidden = _reference(llm, emb, tokenizer_dir, text)
            n_tok = int(ds.n_tokens[prompt])
            stored = ds.resid.sel(pass_=name).isel(prompt=prompt).values
            for layer in range(n_layers):
                np.testing.assert_allclose(stored[layer, :n_tok], hidden[layer][0].numpy(), atol=1e-5, rtol=0,
                                           err_msg=f"{name} prompt {prompt} layer {layer}")
            np.testing.assert_allclose(ds.final.sel(pass_=name).isel(prompt=prompt).values[:n_tok],
                                       hidden[n_layers][0].numpy(), atol=1e-5, rtol=0)
            assert np.isnan(stored[:, n_tok:]).all()
    # The swap must matter: BS and SS share the LLM but not the embeddings.
    assert not np.allclose(ds.resid.sel(pass_="BS").values[:, 1:2], ds.resid.sel(pass_="SS").values[:, 1:2],
                           equal_nan=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_embedding_only_load_equals_full_model(arch, make_model):
    path = make_model(arch, seed=3)
    module = load_input_embedding(str(path), "float32", "cpu")
    ids = torch.arange(0, 40).reshape(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(module(ids), load(path).get_input_embeddings()(ids), atol=0, rtol=0)


def test_custom_pass_with_other_unembedding(make_model, tmp_path):
    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    ds = _capture(tmp_path, base, sft, passes="SS,X=sft:base:base")
    assert list(ds.pass_.values) == ["SS", "X"]
    assert list(ds.unembedding.values) == ["sft", "base"]
    assert list(ds.embedding.values) == ["sft", "base"]


def test_parse_passes():
    assert parse_passes(None) == DEFAULT_PASSES
    assert [p.name for p in parse_passes("bb, SS")] == ["BB", "SS"]
    custom = parse_passes(["BS", "mine=base:sft:sft"])[1]
    assert (custom.llm, custom.embedding, custom.unembedding) == ("base", "sft", "sft")
    assert parse_passes("a=sft:base")[0].unembedding == "sft"
    with pytest.raises(UsageError, match="unknown pass 'XX'"):
        parse_passes("BB,XX")
    with pytest.raises(UsageError, match="listed twice"):
        parse_passes("BB,bb")
    with pytest.raises(UsageError, match="unknown pass"):
        parse_passes("x=gpu:base")


def test_schedule_groups_by_llm_base_first():
    assert schedule(DEFAULT_PASSES) == [("base", [0, 2]), ("sft", [1, 3])]
    assert schedule(parse_passes("SS,BB")) == [("base", [1]), ("sft", [0])]


def test_parse_pairs():
    from capture.plan.passes import parse_pass_pairs

    default = parse_pass_pairs(None, DEFAULT_PASSES)
    assert [p.name for p in default] == ["BB-BS", "BB-SB", "BB-SS", "BS-SB", "BS-SS", "SB-SS"]
    assert [(p.left, p.right) for p in default] == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    custom = parse_pass_pairs("ss-bb, mine=BS:SB", DEFAULT_PASSES)
    assert [(p.name, p.left, p.right) for p in custom] == [("SS-BB", 3, 0), ("mine", 1, 2)]
    with pytest.raises(UsageError, match="does not name two passes"):
        parse_pass_pairs("BB-XX", DEFAULT_PASSES)
    with pytest.raises(UsageError, match="listed twice"):
        parse_pass_pairs("BB-SS,BB-SS", DEFAULT_PASSES)
    assert [p.name for p in parse_pass_pairs(None, parse_passes("SS,BB"))] == ["SS-BB"]
