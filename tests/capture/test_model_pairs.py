from __future__ import annotations

import pytest

from capture.errors import ModelPairNotFound
from capture.models.registry import MODEL_PAIRS, get_model_pair
from store.errors import ResdiffError

REQUIRED = ["gpt2", "qwen0.5b", "qwen1.5b", "qwen3b", "qwen7b", "qwen-math-1.5b", "qwen-math-7b",
            "llama3.1-8b", "minitron-8b", "tiny"]


def test_registry_has_every_required_pair():
    assert set(REQUIRED) <= set(MODEL_PAIRS)
    assert get_model_pair("qwen1.5b").base == "Qwen/Qwen2.5-1.5B"
    assert get_model_pair("qwen1.5b").sft == "Qwen/Qwen2.5-1.5B-Instruct"
    assert get_model_pair("minitron-8b").sft == "nvidia/Mistral-NeMo-Minitron-8B-Instruct"
    assert get_model_pair("llama3.1-8b").base == "meta-llama/Llama-3.1-8B"


@pytest.mark.parametrize("spelling", ["qwen-1.5b", "Qwen1.5B", "QWEN_1.5B", "qwen2.5-1.5b", " qwen 1.5b "])
def test_obvious_spellings(spelling):
    assert get_model_pair(spelling).name == "qwen1.5b"


def test_unknown_pair_suggests_closest():
    with pytest.raises(ModelPairNotFound) as info:
        get_model_pair("qwen1.8b")
    message = str(info.value)
    assert "unknown model pair 'qwen1.8b'" in message and "did you mean 'qwen1.5b'" in message
    assert isinstance(info.value, (ResdiffError, KeyError))


def test_memory_estimate_is_one_model_plus_other_embeddings():
    spec = get_model_pair("qwen1.5b")
    expected = (spec.n_params + spec.vocab * spec.hidden) * 2
    assert spec.memory_estimate_bytes() == int(expected)
    assert spec.memory_estimate_bytes("float32") == int(expected * 2)
