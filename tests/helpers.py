"""Shared test data and helpers (import these; fixtures live in ``conftest.py``)."""

from __future__ import annotations

import torch

VOCAB = 320
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Residual streams carry information between transformer blocks.",
    "Explain the moon landing in one paragraph.",
    "Write a short Python function that adds two numbers.",
    "Yes or no: is the sky blue?",
] * 4
PROMPTS = [
    "Explain the moon landing.",
    "Yes",
    "Write a short Python function that adds two numbers, please.",
    "The lazy dog sleeps.",
]


def model_config(arch: str, **overrides):
    from transformers import Gemma2Config, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128,
                         bos_token_id=0, eos_token_id=0)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, tie_word_embeddings=True)
    elif arch == "llama":
        cfg = LlamaConfig(**common)
    elif arch == "mistral":
        cfg = MistralConfig(**common, sliding_window=None)
    elif arch == "gemma":
        cfg = GemmaConfig(**common, head_dim=8)
    elif arch == "gemma2":
        cfg = Gemma2Config(**common, head_dim=8)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


ARCHS = ["gpt2", "qwen2", "llama", "mistral", "gemma"]


def load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# Lengths from 1 to ~40 tokens with the test tokenizer: a long tail over a short median.
RAGGED = [
    "Yes",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Explain the moon landing.",
    "Residual streams carry information between transformer blocks, and the fox jumps.",
    "Two",
    "Write a short Python function that adds two numbers, please, and explain it.",
]


def chromium_dom(page, profile) -> str:
    """The DOM headless Chromium renders of the local HTML file ``page`` (skips the test without Chromium)."""
    import shutil
    import subprocess

    import pytest

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium where apt-get can)")
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
