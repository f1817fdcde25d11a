"""Model sizes from configs alone, against the loaded models."""

from __future__ import annotations

import pytest

from capture.plan.budget import checkpoint_dtype, model_footprint
from tests.helpers import load


@pytest.mark.parametrize(("arch", "tied"), [("gpt2", True), ("qwen2", True), ("llama", False), ("gemma", True)])
def test_footprint_counts_what_the_loaded_model_holds(arch, tied, make_model):
    path = make_model(arch)
    model = load(path)
    unique = {id(p): p for p in model.parameters()}.values()
    fp = model_footprint(str(path), "float32", "cpu")
    assert fp.params == sum(p.numel() for p in unique) * 4
    assert fp.embedding == model.get_input_embeddings().weight.numel() * 4
    assert (fp.head == 0) == tied
    if not tied:
        assert fp.head == model.get_output_embeddings().weight.numel() * 4
    assert fp.body == fp.params - fp.embedding - fp.head > 0
    assert fp.mapped  # a float32 checkpoint run in float32 on the CPU stays memory-mapped


def test_dtype_conversion_or_cuda_materialises_the_weights(make_model):
    path = make_model("llama")
    assert checkpoint_dtype(str(path)) == "float32"
    half = model_footprint(str(path), "bfloat16", "cpu")
    assert not half.mapped and half.params == model_footprint(str(path), "float32", "cpu").params // 2
    assert not model_footprint(str(path), "float32", "cuda").mapped
    assert checkpoint_dtype("not/a/local/dir") is None
