"""Shared fixtures: tiny random models of several architectures, built from configs.

Nothing is downloaded: a byte-level BPE tokenizer is trained on a few sentences and
each model is saved with ``save_pretrained`` and loaded back through the real path.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from tests.helpers import PROMPTS, SENTENCES, model_config


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_model(tmp_path_factory, tokenizer_dir):
    """Factory: ``make_model(arch, seed, **config_overrides)`` -> directory of a saved random model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict = {}

    def build(arch: str, seed: int = 0, **overrides) -> Path:
        key = (arch, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(model_config(arch, **overrides))
            path = tmp_path_factory.mktemp(f"{arch}-{seed}")
            model.save_pretrained(path)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
            cache[key] = path
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[str, str, Path]:
    """The real embedded tiny pair, built once per test session: (base_dir, sft_dir, cache_dir)."""
    from capture.models.tiny import ensure_tiny_pair

    cache = tmp_path_factory.mktemp("tiny-cache")
    base, sft = ensure_tiny_pair(cache, log=lambda *a: None)
    return base, sft, cache


@pytest.fixture(scope="session")
def capture_store(make_model, tmp_path_factory):
    """Factory: ``capture_store(arch, **settings)`` -> path of a float32 store of a random ``arch`` pair
    (seeds 0 and 1, ``model_overrides`` on their configs) over ``PROMPTS``, captured with the real capture job."""
    from capture.pipeline.job import run_capture
    from capture.settings import CaptureSettings

    def capture(arch: str = "llama", model_overrides: dict | None = None, **overrides) -> Path:
        path = tmp_path_factory.mktemp(f"store-{arch}") / "s.zarr"
        settings = {"prompts": PROMPTS, "device": "cpu", "store_dtype": "float32", "top_k": 2, **overrides}
        base, sft = (make_model(arch, seed=seed, **(model_overrides or {})) for seed in (0, 1))
        run_capture(CaptureSettings(base=str(base), sft=str(sft),
                                    store=str(path), **settings), log=lambda *a: None, progress=False)
        return path

    return capture
