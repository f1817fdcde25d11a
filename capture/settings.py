"""Capture settings: what the user asked for, and how it resolves to models and paths."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from capture.inputs.prompts import chat_template_mode
from capture.models.registry import TINY, get_model_pair
from store.errors import UsageError
from store.location import sanitize_label
from store.schema import content_digest
from store.units import CODECS, DEFAULT_CODEC, MODEL_DTYPES, STORE_DTYPES, parse_size

BATCH_PADDING = {"cpu": 0.05, "gpu": 0.15}  # default --batch-padding by device (see CaptureSettings.padding_for)
# Default --batch-size by device: on a CPU a forward of 8 prompts was the fastest per token of 8, 16, 32 and 64
# (benchmarks/batching.py, BENCHMARKS.md); a GPU fills with more.
BATCH_SIZE = {"cpu": 8, "gpu": 64}

# Settings that change what is written; a resumed capture must agree on all of them.
CONTENT_KEYS = (
    "base_ref", "sft_ref", "tokenizer_ref", "passes", "prompt_texts_sha256", "n_prompts", "dtype", "store_dtype",
    "add_bos", "chat_template", "max_tokens", "truncate", "lens", "top_k", "tracked", "pass_pairs", "save_lens",
    "variants_sha256", "variant_options", "prompt_index_sha256", "normalize_length", "allow_mismatched_pair",
    "lens_layers", "generate",
)


def _device_kind(device: str) -> str:
    """The key of the per-device defaults: ``cpu``, or ``gpu`` for any accelerator."""
    return "cpu" if str(device).startswith("cpu") else "gpu"


@dataclass
class CaptureSettings:
    """Everything ``cli.py capture`` accepts, with its defaults."""

    model_pair: str | None = TINY  # --pair: a registered base/SFT model pair
    base: str | None = None
    sft: str | None = None
    tokenizer: str | None = None
    passes: str | None = None
    prompts: list[str] = field(default_factory=list)
    prompts_files: list[str] = field(default_factory=list)
    prompt_field: str | None = None  # --field: the prompt's field or column in JSON lines, JSON, CSV, Parquet, datasets
    limit: int | None = None  # keep the first N prompts (after --shuffle)
    shuffle: bool = False
    seed: int | None = None  # --shuffle's (0 when not given) and --temperature's sampling seed
    layers: str | None = None  # --layers 0,8,16:24 (default all)
    lens_layers: str | None = None  # --lens-layers: lens statistics on these stored layers only (default all)
    positions: str | None = None  # --positions first:32 | last:16 (default all)
    cross_layers: str | None = None  # --cross-layers 4,8,12 | 0:24:4: crossed passes B>S@L and S>B@L per split
    generate: int | None = None  # --generate N: capture each prompt followed by up to N tokens a model generates
    generate_with: str | None = None  # which model generates: sft (default) or base
    temperature: float | None = None  # sample the responses at this temperature (default: greedy)
    dtype: str | None = None
    device: str = "auto"
    device_map: str | None = None
    batch_size: int | None = None  # prompts per forward pass, at most (default by device: batch_size_for)
    batch_tokens: int = 8192  # padded tokens per forward pass, at most (a longer prompt runs alone)
    batch_padding: float | None = None  # padded / real tokens of a batch at most 1 + this (default by device)
    max_tokens: int | None = None
    truncate: bool = False
    add_bos: bool = False
    chat_template: str = "auto"  # auto (conversations only), always (plain texts as user turns too), never
    store: str | None = None
    store_dtype: str = "float16"
    codec: str = DEFAULT_CODEC  # compression of the data arrays (store.units.CODECS); not part of the content
    chunk_prompts: int | None = None  # prompts per store chunk (default: chunks of about 16 MB)
    shard_size: str | None = None  # bytes of one array's shard row before compression (default 256MiB)
    overwrite: bool = False
    max_memory: str | None = None  # refuse before loading when the predicted peak is over it
    trust_remote_code: bool = False
    allow_pickle: bool = False  # pickle checkpoints can run code on load: refused unless asked
    allow_mismatched_pair: bool = False  # base and SFT of different architectures (refused unless asked)
    cache_dir: str | None = None
    lens: bool = True
    top_k: int = 20
    track: list[str] = field(default_factory=list)
    pass_pairs: str | None = None  # --pass-pair: which pairs of passes the lens statistics compare
    save_lens: bool = False
    variants: list[str] = field(default_factory=lambda: ["identity"])
    variant_options: dict = field(default_factory=dict)
    normalize_length: bool = False
    embedding_variants: list[str] = field(default_factory=list)  # legacy single-pass mode: format-1 export
    model_kwargs: dict = field(default_factory=dict)
    tokenizer_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.chat_template = chat_template_mode(self.chat_template)  # older configs: True / False

    def batch_size_for(self, device: str) -> int:
        """``--batch-size``, or the device's default (:data:`BATCH_SIZE`)."""
        return self.batch_size if self.batch_size is not None else BATCH_SIZE[_device_kind(device)]

    def padding_for(self, device: str) -> float:
        """``--batch-padding``, or the device's default: on a CPU a small batch costs nothing more per token, so
        batches pad at most 5%; on a GPU a bigger batch fills the device, and 15% is allowed."""
        return self.batch_padding if self.batch_padding is not None else BATCH_PADDING[_device_kind(device)]

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict:
        """The options as the store's ``capture_settings`` attribute records them.

        Inline prompts enter as a count and a digest (their texts are the ``prompt_text``
        coordinate), so the attributes do not grow with the prompt count; ``model_pair``
        is empty when ``--base``/``--sft`` named the models.
        """
        record = self.to_dict()
        record["prompts"] = {"count": len(self.prompts), "sha256": content_digest(self.prompts)}
        if self.base or self.sft:
            record["model_pair"] = None
        return record

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


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available here; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: resdiff captures on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if kind == "cuda" and torch.device(device).index is not None and torch.device(device).index >= \
            torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                         "use cuda:0 to cuda:N-1")
    return device


def resolve_models(settings: CaptureSettings) -> ResolvedModels:
    """Turn ``--pair`` or ``--base/--sft`` into model references, a label and a dtype."""
    if settings.batch_size is not None and settings.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if settings.batch_padding is not None and settings.batch_padding < 0:
        raise UsageError(f"--batch-padding must be 0 or more (a fraction of the real tokens), got "
                         f"{settings.batch_padding}")
    if settings.batch_tokens < 1:
        raise UsageError(f"--batch-tokens must be at least 1, got {settings.batch_tokens}")
    if bool(settings.base) != bool(settings.sft):
        raise UsageError("give both --base and --sft (or neither, and a --pair)")
    if settings.base:
        label = sanitize_label(f"{Path(settings.base).name}_to_{Path(settings.sft).name}")
        base_ref, sft_ref, dtype, tokenizer = settings.base, settings.sft, "float32", None
    else:
        spec = get_model_pair(settings.model_pair or TINY)
        label, dtype, tokenizer = spec.name, spec.dtype, spec.tokenizer
        if spec.built_locally:
            base_ref, sft_ref = spec.build(settings.cache_dir)
        else:
            base_ref, sft_ref = spec.base, spec.sft
    device = resolve_device(settings.device)
    dtype = settings.dtype or dtype
    if dtype not in MODEL_DTYPES:
        raise UsageError(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if settings.chunk_prompts is not None and settings.chunk_prompts < 1:
        raise UsageError(f"--chunk-prompts must be at least 1, got {settings.chunk_prompts}")
    if settings.shard_size is not None:
        parse_size(settings.shard_size, "--shard-size")
    if settings.codec not in CODECS:
        raise UsageError(f"--codec must be one of {', '.join(CODECS)}, got {settings.codec!r}")
    if settings.store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype must be float16 or float32, got {settings.store_dtype!r}")
    return ResolvedModels(label, base_ref, sft_ref, settings.tokenizer or tokenizer or base_ref, dtype, device)
