"""Capture settings: what the user asked for, and how it resolves to models and paths."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from capture.errors import UsageError
from capture.pairs import TINY, get_pair

# Settings that change what is written; a resumed capture must agree on all of them.
CONTENT_KEYS = (
    "base_ref", "sft_ref", "tokenizer_ref", "passes", "prompt_texts", "dtype", "store_dtype",
    "add_bos", "chat_template", "max_tokens", "truncate", "lens", "top_k", "tracked", "pairs", "save_lens",
    "variants", "variant_options", "normalize_length",
)


@dataclass
class CaptureSettings:
    """Everything ``cli.py capture`` accepts, with its defaults."""

    pair: str | None = TINY
    base: str | None = None
    sft: str | None = None
    tokenizer: str | None = None
    passes: str | None = None
    prompts: list[str] = field(default_factory=list)
    prompts_files: list[str] = field(default_factory=list)
    dtype: str | None = None
    device: str = "auto"
    device_map: str | None = None
    batch_size: int = 8
    scheduler: str | None = None  # tcp://HOST:PORT of a dask.distributed scheduler
    local_cluster: int | None = None  # worker processes to start on loopback
    max_tokens: int | None = None
    truncate: bool = False
    add_bos: bool = False
    chat_template: bool = False
    store: str | None = None
    store_dtype: str = "float16"
    chunk_prompts: int | None = None  # prompts per store chunk (default: chunks of about 16 MB)
    overwrite: bool = False
    max_memory: str | None = None  # refuse before loading when the predicted peak is over it
    trust_remote_code: bool = False
    allow_pickle: bool = False  # pickle checkpoints can run code on load: refused unless asked
    cache_dir: str | None = None
    lens: bool = True
    top_k: int = 20
    track: list[str] = field(default_factory=list)
    pairs: str | None = None
    save_lens: bool = False
    variants: list[str] = field(default_factory=lambda: ["identity"])
    variant_options: dict = field(default_factory=dict)
    normalize_length: bool = False
    embedding_variants: list[str] = field(default_factory=list)  # legacy single-pass mode: format-1 export
    model_kwargs: dict = field(default_factory=dict)
    tokenizer_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def load_kwargs(self) -> dict:
        """Extra ``from_pretrained`` arguments for models; the dtype is resdiff's own option."""
        extra = {k: v for k, v in self.model_kwargs.items() if k not in ("torch_dtype", "dtype", "low_cpu_mem_usage")}
        # use_safetensors=False would refuse safetensors; None prefers them and falls back to pickle.
        return {"use_safetensors": None if self.allow_pickle else True, **extra}


@dataclass(frozen=True)
class ResolvedModels:
    label: str
    base_ref: str
    sft_ref: str
    tokenizer_ref: str
    dtype: str
    device: str


def sanitize_label(text: str) -> str:
    """Runs of non-alphanumerics become one ``_``: ``Qwen/Qwen2.5-0.5B`` -> ``Qwen_Qwen2_5_0_5B``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available here; use --device cpu")
    return device


def resolve_models(settings: CaptureSettings, ensure_tiny=None) -> ResolvedModels:
    """Turn ``--pair`` or ``--base/--sft`` into model references, a label and a dtype."""
    if settings.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if bool(settings.base) != bool(settings.sft):
        raise UsageError("give both --base and --sft (or neither, and a --pair)")
    if settings.base:
        label = sanitize_label(f"{Path(settings.base).name}_to_{Path(settings.sft).name}")
        base_ref, sft_ref, dtype, tokenizer = settings.base, settings.sft, "float32", None
    else:
        spec = get_pair(settings.pair or TINY)
        label, dtype, tokenizer = spec.name, spec.dtype, spec.tokenizer
        if spec.name == TINY:
            if ensure_tiny is None:
                from capture.tiny import ensure_tiny_pair as ensure_tiny
            base_ref, sft_ref = ensure_tiny(settings.cache_dir)
        else:
            base_ref, sft_ref = spec.base, spec.sft
    device = resolve_device(settings.device)
    dtype = settings.dtype or dtype
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if settings.chunk_prompts is not None and settings.chunk_prompts < 1:
        raise UsageError(f"--chunk-prompts must be at least 1, got {settings.chunk_prompts}")
    if settings.store_dtype not in ("float16", "float32"):
        raise UsageError(f"--store-dtype must be float16 or float32, got {settings.store_dtype!r}")
    return ResolvedModels(label, base_ref, sft_ref, settings.tokenizer or tokenizer or base_ref, dtype, device)
