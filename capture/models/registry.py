"""Registry of named base/SFT model pairs.

A pair is addressed by a short name (``--pair qwen1.5b``). Spelling is forgiving:
case, dashes, underscores and spaces are ignored, so ``Qwen-1.5B`` finds ``qwen1.5b``.
The shape numbers are published model facts used only for memory estimates and
``capture --plan``; the real shapes are always read from the model configs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from capture.errors import ModelPairNotFound
from store import units

TINY = "tiny"

@dataclass(frozen=True)
class ModelPairSpec:
    """One registered base/SFT pair and its published shape."""

    name: str
    base: str
    sft: str
    dtype: str
    n_params: float  # parameters of one model
    n_layers: int
    hidden: int
    vocab: int
    tokenizer: str | None = None
    builder: str | None = None  # "module:function" that builds the pair locally (offline) and returns its dirs

    @property
    def built_locally(self) -> bool:
        return self.builder is not None

    def build(self, cache_dir: str | None = None) -> tuple[str, str]:
        """(base_dir, sft_dir) of a locally built pair, building it on first use."""
        import importlib

        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(cache_dir)

    def memory_estimate_bytes(self, dtype: str | None = None) -> int:
        """Peak weights in memory: one resident model plus the other's input embeddings."""
        per_param = units.itemsize(dtype or self.dtype)
        other_embedding = self.vocab * self.hidden
        return int((self.n_params + other_embedding) * per_param)


def _qwen(name: str, size: str, n_params: float, n_layers: int, hidden: int, vocab: int, math: bool = False):
    family = "Qwen2.5-Math" if math else "Qwen2.5"
    base = f"Qwen/{family}-{size}"
    return ModelPairSpec(name, base, f"{base}-Instruct", "bfloat16", n_params, n_layers, hidden, vocab)


MODEL_PAIRS: dict[str, ModelPairSpec] = {
    spec.name: spec
    for spec in (
        ModelPairSpec(TINY, "tiny-base", "tiny-sft", "float32", 2.2e5, 4, 64, 512,
                      builder="capture.models.tiny:ensure_tiny_pair"),
        ModelPairSpec("smollm2", "SmolLM2-135M-Instruct", "its astronomy fine-tune", "float32", 1.35e8, 30, 576,
                      49152, builder="capture.models.smollm:ensure_smollm_pair"),
        ModelPairSpec("gpt2", "gpt2", "gpt2", "float32", 1.24e8, 12, 768, 50257),
        _qwen("qwen0.5b", "0.5B", 4.94e8, 24, 896, 151936),
        _qwen("qwen1.5b", "1.5B", 1.54e9, 28, 1536, 151936),
        _qwen("qwen3b", "3B", 3.09e9, 36, 2048, 151936),
        _qwen("qwen7b", "7B", 7.62e9, 28, 3584, 152064),
        _qwen("qwen-math-1.5b", "1.5B", 1.54e9, 28, 1536, 151936, math=True),
        _qwen("qwen-math-7b", "7B", 7.62e9, 28, 3584, 152064, math=True),
        ModelPairSpec(
            "llama3.1-8b", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
            "bfloat16", 8.03e9, 32, 4096, 128256,
        ),
        ModelPairSpec(
            "minitron-8b", "nvidia/Mistral-NeMo-Minitron-8B-Base", "nvidia/Mistral-NeMo-Minitron-8B-Instruct",
            "bfloat16", 8.41e9, 40, 4096, 131072,
        ),
    )
}


def _normalise(name: str) -> str:
    key = name.strip().lower()
    for ch in "-_ /":
        key = key.replace(ch, "")
    return key.replace("qwen2.5", "qwen")


_BY_KEY = {_normalise(name): name for name in MODEL_PAIRS}


def get_model_pair(name: str) -> ModelPairSpec:
    """Return the pair registered under ``name`` (forgiving spelling).

    >>> get_model_pair("Qwen-1.5B").sft
    'Qwen/Qwen2.5-1.5B-Instruct'
    """
    key = _normalise(name)
    if key in _BY_KEY:
        return MODEL_PAIRS[_BY_KEY[key]]
    close = difflib.get_close_matches(key, list(_BY_KEY), n=1, cutoff=0.5)
    hint = f" (did you mean {_BY_KEY[close[0]]!r}?)" if close else ""
    raise ModelPairNotFound(name=name, hint=hint)
