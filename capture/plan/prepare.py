"""Everything a capture derives before any weights are loaded, and the store template.

Validation runs cheapest first (pass list, prompts, configs, tokenizer), so bad input
fails in seconds; the result, :class:`Prepared`, is what the capture job and the
memory plan (``capture.plan.memory``) both start from.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from capture.inputs.prompts import (
    TokenizedPrompts,
    collect_prompts,
    describe_templating,
    normalize_lengths,
    resolve_tracked,
    templated_prompts,
    tokenize_prompts,
)
from capture.inputs.responses import Generation, check_generation, pending
from capture.inputs.selection import Positions, StoredWindow, parse_layers
from capture.inputs.variants import expand_prompts
from capture.models.loading import check_compatible, check_safe_weights, load_tokenizer, read_shape
from capture.plan.passes import (
    Pass,
    PassPair,
    crossed_passes,
    parse_cross_layers,
    parse_pass_pairs,
    parse_passes,
    source_pass,
)
from capture.settings import CaptureSettings, ResolvedModels, resolve_models
from store import units
from store.chunking import Chunking, choose_chunking, shard_prompts
from store.errors import UsageError
from store.location import StorePath, is_url, normalize
from store.schema import (
    LAYER_SEMANTICS,
    add_lens_variables,
    add_saved_lens_variables,
    build_template,
    content_digest,
    statistics_bytes_per_position,
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


def _model_record(ref: str, shape, tokenizer_ref: str, store) -> dict:
    from transformers import AutoConfig

    from store.location import model_location

    revision = getattr(AutoConfig.from_pretrained(ref), "_commit_hash", None)
    tokenizer = {f"tokenizer{k.removeprefix('ref')}": v for k, v in model_location(tokenizer_ref, store).items()}
    return {**model_location(ref, store), "revision": revision or ("local" if Path(ref).is_dir() else None),
            "arch": shape.arch, "n_layers": shape.n_layers, "hidden": shape.hidden, "vocab": shape.vocab,
            **tokenizer}



@dataclass
class Prepared:
    """Everything validated and derived before any weights are loaded.

    The per-prompt lists are in store order (:func:`arrange`); ``source`` keeps the prompts' own tokens in
    source order, from which a capture with ``--generate`` arranges the prompts again once their responses
    exist (until then ``tokenized`` holds each prompt with room for its longest response, ``responded`` False).
    """

    settings: CaptureSettings
    passes: tuple[Pass, ...]
    pass_pairs: tuple[PassPair, ...]
    refs: dict[str, str]
    shapes: dict
    resolved: ResolvedModels
    tokenizer: object
    tracked: tuple[list[int], list[str]]
    path: StorePath
    fingerprint: dict
    source: TokenizedPrompts  # the prompts' tokens in source order (labels: none)
    source_index: list[int]  # each source prompt's row in the prompts before --limit/--shuffle
    source_variants: list[str]
    positions: Positions
    layers: list[int]
    generation: Generation | None = None
    responded: bool = True  # False while --generate's responses are not known
    # derived by arrange():
    prompt_index: list[int] = field(default_factory=list)  # per store row, like every per-prompt list here
    variants: list[str] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)  # full token counts (the stored window may be shorter)
    tokenized: TokenizedPrompts | None = None  # store order: what each forward sees (ids), its source position (labels)
    window: StoredWindow | None = None  # what of each prompt is stored
    chunking: Chunking | None = None

    @property
    def lens_sources(self) -> set[str]:
        wanted = self.settings.lens or self.settings.save_lens
        return {p.unembedding for p in self.passes} if wanted else set()


def prepare(settings: CaptureSettings, log) -> Prepared:
    # Cheap checks first, so that bad input fails before any model is built or read.
    generation = check_generation(settings.generate, settings.generate_with, settings.temperature, settings.seed,
                                  settings.positions, log)
    passes = parse_passes(settings.passes)
    if settings.lens:
        parse_pass_pairs(settings.pass_pairs, passes, allow_crossed=settings.cross_layers is not None)
    if settings.top_k < 0:
        raise UsageError(f"--top-k must be 0 or more, got {settings.top_k}")
    sources, source_rows = collect_prompts(settings.prompts_files, settings.prompts, field=settings.prompt_field,
                                           limit=settings.limit, shuffle=settings.shuffle, seed=settings.seed or 0)
    texts, expanded_from, variants = expand_prompts(sources, settings.variants, settings.variant_options)
    prompt_index = [source_rows[i] for i in expanded_from]
    templated_prompts(texts, settings.chat_template)  # a conversation under `never` is refused before any load
    positions = Positions.parse(settings.positions)
    resolved = resolve_models(settings)
    path = normalize(settings.store or f"outputs/{resolved.label}.zarr")
    if generation and is_url(path):
        raise UsageError("--generate journals its responses beside the store on a local disk; capture into a "
                         "local --store and copy it to the object store afterwards")
    refs = {"base": resolved.base_ref, "sft": resolved.sft_ref}
    for ref in refs.values():
        check_safe_weights(ref, settings.allow_pickle)
    shapes = {k: read_shape(v, settings.trust_remote_code) for k, v in refs.items()}
    check_compatible(shapes["base"], shapes["sft"], refs, settings.allow_mismatched_pair)
    passes = _with_crossed(passes, settings, shapes["base"].n_layers, path)
    pass_pairs = parse_pass_pairs(settings.pass_pairs, passes) if settings.lens else ()
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
                                 max_tokens=limit, truncate=settings.truncate, limit_reason=why,
                                 generation_prompt=generation is not None)
    mixed = describe_templating(tokenized.templated, settings.chat_template)
    if mixed:
        log(mixed)
    if settings.normalize_length:
        tokenized, message = normalize_lengths(tokenizer, tokenized)
        log(message or f"prompt lengths already equal ({tokenized.lengths[0]} tokens); nothing cut")
    layers = parse_layers(settings.layers, shapes["base"].n_layers + 1)
    lens_layers = _lens_layers(settings, layers, shapes["base"].n_layers + 1)
    # Per-prompt lists enter as digests, so that the attributes do not grow with the prompt count.
    fingerprint = {
        "base_ref": resolved.base_ref, "sft_ref": resolved.sft_ref, "tokenizer_ref": resolved.tokenizer_ref,
        "passes": [p.to_dict() for p in passes], "n_prompts": len(texts), "prompt_texts_sha256": content_digest(texts),
        "dtype": resolved.dtype, "store_dtype": settings.store_dtype, "add_bos": settings.add_bos,
        "chat_template": settings.chat_template, "max_tokens": settings.max_tokens, "truncate": settings.truncate,
        "lens": settings.lens, "top_k": min(settings.top_k, vocab), "tracked": tracked[0],
        "pass_pairs": [[q.name, passes[q.left].name, passes[q.right].name] for q in pass_pairs],
        "save_lens": settings.save_lens, "variants_sha256": content_digest(variants),
        "variant_options": settings.variant_options, "prompt_index_sha256": content_digest(prompt_index),
        "normalize_length": settings.normalize_length, "allow_mismatched_pair": settings.allow_mismatched_pair,
        "layers": layers, "positions": positions.describe(), "lens_layers": lens_layers,
        **({"generate": generation.record()} if generation else {}),  # absent without: older stores still resume
    }
    prep = Prepared(settings, passes, pass_pairs, refs, shapes, resolved, tokenizer, tracked, path, fingerprint,
                    tokenized, prompt_index, variants, positions, layers, generation)
    if generation:
        context = shapes[generation.model].max_positions
        return arrange(prep, pending(tokenized, generation.new_tokens, context, pad_id_of(tokenizer)),
                       responded=False)
    return arrange(prep, tokenized)


def _with_crossed(passes: tuple[Pass, ...], settings: CaptureSettings, n_layers: int, path: StorePath
                  ) -> tuple[Pass, ...]:
    """The pass plan with ``--cross-layers``'s crossed passes after the others; refused where they cannot run."""
    splits = parse_cross_layers(settings.cross_layers, n_layers)
    if not splits:
        return passes
    if is_url(path):
        raise UsageError("--cross-layers keeps the states it carries between models beside the store on a local "
                         "disk; capture into a local --store and copy it to the object store afterwards")
    if settings.device_map:
        raise UsageError("--cross-layers runs each model's blocks apart from the others; it does not work with "
                         "--device-map yet: drop one of them")
    crossed = crossed_passes(splits)
    plan = passes + crossed
    for p in crossed:
        source_pass(plan, p)  # refused here when --passes leaves out BB or SS
    return plan


def arrange(prep: Prepared, tokenized: TokenizedPrompts, responded: bool = True) -> Prepared:
    """``prep`` with ``tokenized`` (source order) as the prompts captured: in store order, cut to their stored
    windows, and the store's chunking and shards chosen for them. ``responded`` False: ``tokenized`` holds
    placeholders for responses not generated yet (what the memory plan counts)."""
    settings, shapes, layers = prep.settings, prep.shapes, prep.layers
    full_lengths = tokenized.lengths
    tokenized, window = _store_order(tokenized, prep.positions, layers)
    hidden, itemsize = shapes["base"].hidden, units.itemsize(settings.store_dtype)
    chunking = choose_chunking(window.lengths, len(layers), hidden, itemsize,
                               small_store_one_chunk=not settings.chunk_prompts)
    if settings.chunk_prompts:
        chunking = replace(chunking, prompt=min(settings.chunk_prompts, len(full_lengths)))
    if not is_url(prep.path):  # object stores hold many objects well and a shard there is rewritten per write
        n_stats = len(prep.fingerprint["lens_layers"]) * settings.lens
        per_position = max((len(layers) + 1) * hidden * itemsize,  # resid and final of one pass
                           statistics_bytes_per_position(len(prep.passes), len(prep.pass_pairs),
                                                         prep.fingerprint["top_k"], len(prep.tracked[0])) * n_stats)
        target = units.parse_size(settings.shard_size, "--shard-size") if settings.shard_size else None
        chunking = replace(chunking, shard=shard_prompts(window.lengths, chunking, per_position, target))
    in_store_order = lambda items: [items[i] for i in tokenized.labels]  # noqa: E731
    return replace(prep, responded=responded, prompt_index=in_store_order(prep.source_index),
                   variants=in_store_order(prep.source_variants),
                   prompt_lengths=in_store_order(full_lengths), tokenized=tokenized, window=window, chunking=chunking)


def _lens_layers(settings: CaptureSettings, layers: list[int], n_layers1: int) -> list[int]:
    """The stored layers whose lens statistics are computed (``--lens-layers``; default every stored layer)."""
    if settings.lens_layers is None:
        return list(layers)
    chosen = parse_layers(settings.lens_layers, n_layers1, "--lens-layers")
    missing = [la for la in chosen if la not in layers]
    if missing:
        raise UsageError(f"--lens-layers names layer {missing[0]}, which is not stored (--layers keeps "
                         f"{', '.join(map(str, layers))}); choose among the stored layers")
    if not settings.lens:
        raise UsageError("--lens-layers chooses where lens statistics are computed, but --no-lens computes none; "
                         "drop one of them")
    return chosen


def _store_order(tokenized: TokenizedPrompts, positions: Positions, layers: list[int]
                 ) -> tuple[TokenizedPrompts, StoredWindow]:
    """The prompts in store order (longest forward first, then longest stored, then source order), cut to
    what the forward needs for ``positions``, and the window of each that is stored."""
    windows = [positions.window(n) for n in tokenized.lengths]
    order = sorted(range(len(windows)), key=lambda i: (-windows[i][1], windows[i][0] - windows[i][1], i))
    ordered = tokenized.take(order)
    ordered.ids = [ids[: windows[i][1]] for i, ids in zip(order, ordered.ids, strict=True)]  # later tokens: unused
    starts = [windows[i][0] for i in order]
    stops = [windows[i][1] for i in order]
    ordered.pieces = [p[a:b] for p, a, b in zip(ordered.pieces, starts, stops, strict=True)]
    if ordered.roles is not None:
        ordered.roles = [r[a:b] for r, a, b in zip(ordered.roles, starts, stops, strict=True)]
    return ordered, StoredWindow(start=starts, stop=stops, layers=layers)


def make_template(prep: Prepared, sizing: bool = False):
    """The store's template; ``sizing`` (the memory plan) accepts a ``--generate`` capture's placeholder responses
    (each as long as it may get), which a store is never created from."""
    if not (prep.responded or sizing):
        raise RuntimeError("a --generate capture's template needs its responses: arrange them first")
    settings, resolved, chunking = prep.settings, prep.resolved, prep.chunking
    attrs = {
        "content_fingerprint": prep.fingerprint,
        "capture_settings": settings.record(),
        "models": {k: _model_record(prep.refs[k], prep.shapes[k], resolved.tokenizer_ref, prep.path)
                   for k in prep.refs},
        "pair_label": resolved.label, "model_dtype": resolved.dtype, "store_dtype": settings.store_dtype,
        "device": resolved.device, "pass_plan": [p.to_dict() for p in prep.passes],
        "layer_semantics": LAYER_SEMANTICS, "library_versions": _versions(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "chunking": {"prompt": chunking.prompt, "layer": chunking.layer, "token": chunking.token,
                     **({"shard": chunking.shard} if chunking.shard else {})},
        "embedding_variants": list(settings.embedding_variants),
        **({"generation": prep.generation.record()} if prep.generation else {}),
    }
    tokens, window = prep.tokenized, prep.window
    responses = None
    if tokens.response_start is not None:
        responses = {"response_start": tokens.response_start, "stop_reason": tokens.stop_reason,
                     "response_text": [prep.tokenizer.decode(ids[start:])
                                       for ids, start in zip(tokens.ids, tokens.response_start, strict=True)]}
    ds = build_template(
        passes=[p.to_dict() for p in prep.passes], texts=tokens.texts,
        token_ids=[ids[a:b] for ids, a, b in zip(tokens.ids, window.start, window.stop, strict=True)],
        token_pieces=tokens.pieces, layers=window.layers, prompt_labels=tokens.labels,
        prompt_index=prep.prompt_index, variants=prep.variants, prompt_lengths=prep.prompt_lengths,
        token_positions=[list(range(a, b)) for a, b in zip(window.start, window.stop, strict=True)],
        roles=tokens.roles, templated=tokens.templated, hidden=prep.shapes["base"].hidden,
        store_dtype=settings.store_dtype, chunking=chunking, responses=responses,
        attrs=attrs,
    )
    if settings.save_lens:
        ds = add_saved_lens_variables(ds, sources=sorted(prep.lens_sources), vocab=prep.shapes["base"].vocab,
                                      hidden=prep.shapes["base"].hidden)
    if settings.lens:
        ds = add_lens_variables(
            ds, pairs=[tuple(x) for x in prep.fingerprint["pass_pairs"]], top_k=prep.fingerprint["top_k"],
            tracked_ids=prep.tracked[0], tracked_strs=prep.tracked[1], chunk_prompt=chunking.prompt,
            chunk_token=chunking.token, lens_layers=prep.fingerprint["lens_layers"], flag_chunk=chunking.shard,
        )
    return ds


def pad_id_of(tokenizer) -> int:
    """The id right-padded positions get (masked out, so any valid id does)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
