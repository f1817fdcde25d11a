"""The embedded ``tiny`` pair: a small base model and its SFT copy, built offline.

The base model (Qwen2 architecture, 4 blocks, width 64) learns next-token prediction
on a small plain-text corpus shipped in ``capture/data``; the SFT model starts from
the base weights and is fine-tuned on chat-formatted text, so the two differ the way
a base and its instruction-tuned variant do (embeddings included). Everything is
seeded and single-threaded, so a build is deterministic on a given machine; it takes
well under a minute on 2 cores and is cached by a hash of the recipe and the data.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from store.atomic import atomic_output

DATA_DIR = Path(__file__).parent.parent / "data"
CORPUS_FILE = DATA_DIR / "tiny_corpus.txt"
CHAT_FILE = DATA_DIR / "tiny_chat.txt"
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
RECIPE = {
    "version": 1,
    "vocab": 512,
    "hidden": 64,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "mlp": 192,
    "context": 256,
    "seq": 48,
    "batch": 16,
    "base_steps": 300,
    "base_lr": 3e-3,
    "sft_steps": 150,
    "sft_lr": 1e-3,
    "seed": 0,
}


def recipe_hash() -> str:
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for path in (CORPUS_FILE, CHAT_FILE):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


@contextmanager
def deterministic():
    threads = torch.get_num_threads()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(previous)


def _train_tokenizer(texts: list[str]):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=RECIPE["vocab"], min_frequency=2,
                            special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>", eos_token="<|end|>",
        pad_token="<|pad|>", unk_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _stream(tokenizer, lines: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for line in lines:
        ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids, dtype=torch.long)


def _train(model, stream: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    seq, batch = RECIPE["seq"], RECIPE["batch"]
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
        windows = torch.stack([stream[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=windows, labels=windows).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    return float(loss.detach())


def build_tiny_pair(out_dir: Path) -> dict[str, float]:
    """Train the pair into ``out_dir/base`` and ``out_dir/sft``; return the final losses."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    from transformers.utils import logging as hf_logging

    corpus = CORPUS_FILE.read_text(encoding="utf-8").splitlines()
    chat = CHAT_FILE.read_text(encoding="utf-8").splitlines()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with deterministic():
        torch.manual_seed(RECIPE["seed"])
        tokenizer = _train_tokenizer(corpus + chat)
        vocab_rows = -(-len(tokenizer) // 64) * 64  # padded rows, like real checkpoints
        config = Qwen2Config(
            vocab_size=vocab_rows, hidden_size=RECIPE["hidden"], intermediate_size=RECIPE["mlp"],
            num_hidden_layers=RECIPE["layers"], num_attention_heads=RECIPE["heads"],
            num_key_value_heads=RECIPE["kv_heads"], max_position_embeddings=RECIPE["context"],
            tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        model = AutoModelForCausalLM.from_config(config)
        losses = {"base": _train(model, _stream(tokenizer, corpus), RECIPE["base_steps"], RECIPE["base_lr"], 1)}
        for name in ("base", "sft"):
            if name == "sft":
                losses["sft"] = _train(model, _stream(tokenizer, chat), RECIPE["sft_steps"], RECIPE["sft_lr"], 2)
            model.save_pretrained(out_dir / name)
            tokenizer.save_pretrained(out_dir / name)
    if bars_were_on:
        hf_logging.enable_progress_bar()
    (out_dir / "recipe.json").write_text(json.dumps({"recipe": RECIPE, "losses": losses}, indent=2))
    return losses


def default_cache_dir() -> Path:
    return Path(os.environ.get("RESDIFF_CACHE", "outputs/models"))


def ensure_tiny_pair(cache_dir: str | Path | None = None, log=print) -> tuple[str, str]:
    """Return (base_dir, sft_dir) of the tiny pair, building it on first use.

    The build goes to a temporary directory and is renamed into place when complete,
    so an interrupted build never leaves a half-written pair behind.
    """
    def build(out: Path) -> str:
        losses = build_tiny_pair(out)
        return f"tiny pair built: final loss base {losses['base']:.2f}, sft {losses['sft']:.2f}"

    return ensure_built_pair(cache_dir, f"tiny-{recipe_hash()}", "tiny pair", build, log)


def ensure_built_pair(cache_dir: str | Path | None, name: str, what: str, build: Callable[[Path], str],
                      log=print) -> tuple[str, str]:
    """(base_dir, sft_dir) of a locally built pair ``cache_dir/name``, running ``build`` on first use.

    ``build(out)`` writes ``out/base``, ``out/sft`` and ``out/recipe.json`` and returns a line
    to log. It writes to a unique temporary directory renamed into place when complete, so an
    interrupted build never leaves a half-written pair, and of two processes building at
    once the first to finish wins.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache / name
    if not (final / "recipe.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"building the {what} in {final} (first use only) ...")
        with atomic_output(final, unique=True, keep_existing=True) as tmp:
            tmp.mkdir()
            message = build(tmp)
        log(message)
    return str(final / "base"), str(final / "sft")
