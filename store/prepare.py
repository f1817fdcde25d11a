"""Everything a capture derives before any weights are loaded, and the store template.

Validation runs cheapest first (pass list, prompts, configs, tokenizer), so bad input
fails in seconds; the result, :class:`Prepared`, is what the capture job and the
memory plan (``store.capture_plan``) both start from.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from capture.errors import UsageError
from capture.models import check_compatible, check_safe_weights, load_tokenizer, read_shape
from capture.plan import Pass, PassPair, parse_pairs, parse_passes
from capture.prompts import TokenizedPrompts, collect_prompts, normalize_lengths, resolve_tracked, tokenize_prompts
from capture.settings import CaptureSettings, ResolvedModels, resolve_models
from capture.variants import expand_prompts
from store.location import StorePath, normalize
from store.schema import (
    LAYER_SEMANTICS,
    Chunking,
    add_lens_variables,
    add_saved_lens_variables,
    build_template,
    choose_chunking,
)


def _versions() -> dict[str, str]:
    import dask
    import numpy
    import transformers
    import xarray
    import zarr

    mods = {"torch": torch, "transformers": transformers, "numpy": numpy, "xarray": xarray, "zarr": zarr,
            "dask": dask}
    return {"python": platform.python_version(), **{k: m.__version__ for k, m in mods.items()}}


def _model_record(ref: str, shape, tokenizer_ref: str) -> dict:
    from transformers import AutoConfig

    revision = getattr(AutoConfig.from_pretrained(ref), "_commit_hash", None)
    return {"ref": ref, "revision": revision or ("local" if Path(ref).is_dir() else None),
            "arch": shape.arch, "n_layers": shape.n_layers, "hidden": shape.hidden, "vocab": shape.vocab,
            "tokenizer": tokenizer_ref}



@dataclass
class Prepared:
    """Everything validated and derived before any weights are loaded."""

    settings: CaptureSettings
    passes: tuple[Pass, ...]
    pairs: tuple[PassPair, ...]
    refs: dict[str, str]
    shapes: dict
    resolved: ResolvedModels
    tokenizer: object
    tokenized: TokenizedPrompts
    tracked: tuple[list[int], list[str]]
    path: StorePath
    chunking: Chunking
    fingerprint: dict

    @property
    def lens_sources(self) -> set[str]:
        wanted = self.settings.lens or self.settings.save_lens
        return {p.unembedding for p in self.passes} if wanted else set()


def prepare(settings: CaptureSettings, log) -> Prepared:
    # Cheap checks first, so that bad input fails before any model is built or read.
    passes = parse_passes(settings.passes)
    pairs = parse_pairs(settings.pairs, passes) if settings.lens else ()
    if settings.top_k < 0:
        raise UsageError(f"--top-k must be 0 or more, got {settings.top_k}")
    sources = collect_prompts(settings.prompts_files, settings.prompts)
    texts, prompt_index, variants = expand_prompts(sources, settings.variants, settings.variant_options)
    resolved = resolve_models(settings)
    refs = {"base": resolved.base_ref, "sft": resolved.sft_ref}
    for ref in refs.values():
        check_safe_weights(ref, settings.allow_pickle)
    shapes = {k: read_shape(v, settings.trust_remote_code) for k, v in refs.items()}
    check_compatible(shapes["base"], shapes["sft"])
    tokenizer = load_tokenizer(resolved.tokenizer_ref, settings.trust_remote_code, **settings.tokenizer_kwargs)
    vocab = shapes["base"].vocab
    if len(tokenizer) > vocab:
        raise UsageError(
            f"tokenizer {resolved.tokenizer_ref!r} has {len(tokenizer)} tokens but the models have only "
            f"{vocab} embedding rows; pass the models' own tokenizer with --tokenizer"
        )
    tracked = resolve_tracked(tokenizer, settings.track, vocab)
    limit, why = settings.max_tokens, "--max-tokens"
    if limit is None and shapes["base"].max_positions:
        limit, why = shapes["base"].max_positions, "the model's context length"
    tokenized = tokenize_prompts(tokenizer, texts, add_bos=settings.add_bos, chat_template=settings.chat_template,
                                 max_tokens=limit, truncate=settings.truncate, limit_reason=why)
    if settings.normalize_length:
        tokenized, message = normalize_lengths(tokenizer, tokenized)
        log(message or f"prompt lengths already equal ({tokenized.lengths[0]} tokens); nothing cut")
    n_layers1, hidden = shapes["base"].n_layers + 1, shapes["base"].hidden
    itemsize = 2 if settings.store_dtype == "float16" else 4
    chunking = choose_chunking(len(texts), n_layers1, max(tokenized.lengths), hidden, itemsize)
    if settings.chunk_prompts:
        chunking = Chunking(prompt=min(settings.chunk_prompts, len(texts)), layer=chunking.layer)
    fingerprint = {
        "base_ref": resolved.base_ref, "sft_ref": resolved.sft_ref, "tokenizer_ref": resolved.tokenizer_ref,
        "passes": [p.to_dict() for p in passes], "prompt_texts": texts, "dtype": resolved.dtype,
        "store_dtype": settings.store_dtype, "add_bos": settings.add_bos, "chat_template": settings.chat_template,
        "max_tokens": settings.max_tokens, "truncate": settings.truncate, "lens": settings.lens,
        "top_k": min(settings.top_k, vocab), "tracked": tracked[0],
        "pairs": [[q.name, passes[q.left].name, passes[q.right].name] for q in pairs], "save_lens": settings.save_lens,
        "variants": variants, "variant_options": settings.variant_options, "prompt_index": prompt_index,
        "normalize_length": settings.normalize_length,
    }
    path = normalize(settings.store or f"outputs/{resolved.label}.zarr")
    return Prepared(settings, passes, pairs, refs, shapes, resolved, tokenizer, tokenized, tracked, path, chunking,
                     fingerprint)


def make_template(prep: Prepared):
    settings, resolved, chunking = prep.settings, prep.resolved, prep.chunking
    attrs = {
        "content_fingerprint": prep.fingerprint,
        "capture_settings": settings.to_dict(),
        "models": {k: _model_record(prep.refs[k], prep.shapes[k], resolved.tokenizer_ref) for k in prep.refs},
        "pair_label": resolved.label, "model_dtype": resolved.dtype, "store_dtype": settings.store_dtype,
        "device": resolved.device, "pass_plan": [p.to_dict() for p in prep.passes],
        "layer_semantics": LAYER_SEMANTICS, "library_versions": _versions(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "chunking": {"prompt": chunking.prompt, "layer": chunking.layer},
        "embedding_variants": list(settings.embedding_variants),
    }
    ds = build_template(
        passes=[p.to_dict() for p in prep.passes], texts=prep.tokenized.texts, token_ids=prep.tokenized.ids,
        token_pieces=prep.tokenized.pieces, n_layers1=prep.shapes["base"].n_layers + 1,
        prompt_index=prep.fingerprint["prompt_index"], variants=prep.fingerprint["variants"],
        hidden=prep.shapes["base"].hidden, store_dtype=settings.store_dtype, chunking=chunking, attrs=attrs,
    )
    if settings.save_lens:
        ds = add_saved_lens_variables(ds, sources=sorted(prep.lens_sources), vocab=prep.shapes["base"].vocab,
                                      hidden=prep.shapes["base"].hidden)
    if settings.lens:
        ds = add_lens_variables(
            ds, pairs=[tuple(x) for x in prep.fingerprint["pairs"]], top_k=prep.fingerprint["top_k"],
            tracked_ids=prep.tracked[0], tracked_strs=prep.tracked[1], chunk_prompt=chunking.prompt,
        )
    return ds


def pad_id_of(tokenizer) -> int:
    """The id right-padded positions get (masked out, so any valid id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
