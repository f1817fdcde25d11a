"""The embedded tiny pair: built offline, deterministic, and a real base/SFT difference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from capture.models.tiny import build_tiny_pair, ensure_tiny_pair
from tests.helpers import load


def _digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_build_is_deterministic(tiny_pair, tmp_path):
    base, sft, _ = tiny_pair
    build_tiny_pair(tmp_path)
    assert _digest(tmp_path / "base") == _digest(Path(base))
    assert _digest(tmp_path / "sft") == _digest(Path(sft))


def test_cached_after_first_build(tiny_pair):
    base, sft, cache = tiny_pair
    messages = []
    assert ensure_tiny_pair(cache, log=messages.append) == (base, sft)
    assert messages == []  # nothing rebuilt


def test_sft_differs_like_an_instruction_tune(tiny_pair):
    from transformers import AutoTokenizer

    base_dir, sft_dir, _ = tiny_pair
    base, sft = load(base_dir), load(sft_dir)
    tok = AutoTokenizer.from_pretrained(sft_dir)
    assert not torch.equal(base.get_input_embeddings().weight, sft.get_input_embeddings().weight)
    chat = "<|user|> Why does ice float? <|assistant|>"
    ids = torch.tensor([tok(chat, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        # The SFT model continues a chat turn better than the base model does.
        answer = tok(" Water grows lighter when it freezes", add_special_tokens=False)["input_ids"]
        full = torch.cat([ids, torch.tensor([answer])], dim=1)
        losses = [m(input_ids=full, labels=torch.where(torch.arange(full.shape[1]) < ids.shape[1], -100, full)).loss
                  for m in (base, sft)]
    assert losses[1] < losses[0]
    assert tok.chat_template and "<|assistant|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
