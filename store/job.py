"""The capture job: from settings to a complete store, one model resident at a time.

Order of work: validate everything that can be validated without weights (pair,
shapes from configs, passes, pairs, tracked tokens, prompts and their token lengths),
write the template, then for each LLM (base first): load it, keep its lens, run its
passes group by group, write each region and flag it done, free it. Then, with both
lenses in memory, the lens statistics stage (``store.lens_stage``) reads the stored
residuals back and writes the statistics, again flagged per prompt group. Regions
already flagged done are skipped, which is what makes re-running the same command
resume an interrupted capture.
"""

from __future__ import annotations

import datetime as dt
import errno
import platform
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from capture.errors import ResdiffError, StoreConflict, StoreWriteError, UsageError
from capture.lens import Lens, describe_norm
from capture.models import (
    DTYPES,
    check_compatible,
    check_safe_weights,
    input_embedding_copy,
    load_input_embedding,
    load_model,
    load_tokenizer,
    read_shape,
    release_memory,
)
from capture.plan import Pass, PassPair, parse_pairs, parse_passes, schedule
from capture.prompts import (
    TokenizedPrompts,
    collect_prompts,
    normalize_lengths,
    resolve_tracked,
    tokenize_prompts,
)
from capture.runner import Throughput, run_passes
from capture.settings import CONTENT_KEYS, CaptureSettings, ResolvedModels, resolve_models
from capture.variants import expand_prompts
from store.lens_stage import write_lens_statistics
from store.reader import check_store
from store.schema import (
    LAYER_SEMANTICS,
    Chunking,
    add_lens_variables,
    add_saved_lens_variables,
    build_template,
    choose_chunking,
    write_groups,
)
from store.writer import StoreWriter, remove_store


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


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in CONTENT_KEYS if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: stored {old.get(k)!r} vs now {new.get(k)!r}"[:160] for k in keys)


def _open_or_create(path: Path, settings: CaptureSettings, fingerprint: dict, make_template) -> StoreWriter:
    if path.exists() and settings.overwrite:
        remove_store(path)
    if path.exists():
        attrs = check_store(path)
        stored = attrs.get("content_fingerprint", {})
        if stored != fingerprint:
            raise StoreConflict.from_template("store_exists", path=path, diff=_diff(stored, fingerprint) or "unknown")
        return StoreWriter(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return StoreWriter.create(path, make_template())


def run_capture(settings: CaptureSettings, *, log=print, progress: bool = True) -> Path:
    """Run a capture described by ``settings`` and return the store path."""
    from transformers.utils import logging as hf_logging

    # transformers' own loading bars would interleave with ours.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_capture(settings, log, progress)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


@dataclass
class _Prepared:
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
    path: Path
    chunking: Chunking
    fingerprint: dict

    @property
    def lens_sources(self) -> set[str]:
        wanted = self.settings.lens or self.settings.save_lens
        return {p.unembedding for p in self.passes} if wanted else set()


def _prepare(settings: CaptureSettings, log) -> _Prepared:
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
    path = Path(settings.store or f"outputs/{resolved.label}.zarr")
    return _Prepared(settings, passes, pairs, refs, shapes, resolved, tokenizer, tokenized, tracked, path, chunking,
                     fingerprint)


def _make_template(prep: _Prepared):
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


def _residual_stage(prep: _Prepared, writer: StoreWriter, groups: list[slice], bar) -> dict[str, Lens]:
    """Run every pass not yet done, one model resident at a time; return the lenses copied on the way."""
    settings, resolved, passes, refs = prep.settings, prep.resolved, prep.passes, prep.refs
    done_pp = writer.done_pp()
    lens_needed = prep.lens_sources if not writer.lens_done().all() or (
        prep.settings.save_lens and "saved_lens" not in writer.attrs) else set()
    lenses: dict[str, Lens] = {}
    kept: dict = {}  # input embedding modules of models no longer resident
    plan = schedule(passes)
    speed = Throughput()
    for step, (llm, pass_indices) in enumerate(plan):
        todo = [i for i in pass_indices if not done_pp[i].all()]
        later_needs = {passes[i].embedding for _, idx in plan[step + 1:] for i in idx}
        if not todo and llm not in lens_needed:  # resumed past this LLM
            if llm in later_needs:
                kept[llm] = load_input_embedding(refs[llm], resolved.dtype, resolved.device, settings.trust_remote_code,
                                                     settings.allow_pickle)
            continue
        bar.set_description(f"load {llm}")
        model = load_model(refs[llm], resolved.dtype, resolved.device, settings.device_map,
                           settings.trust_remote_code, **settings.load_kwargs())
        device = next(model.parameters()).device
        embeddings = {llm: model.get_input_embeddings(), **kept}
        for other in {passes[i].embedding for i in todo} - embeddings.keys():
            embeddings[other] = load_input_embedding(refs[other], resolved.dtype, device, settings.trust_remote_code,
                                                         settings.allow_pickle)
        if llm in later_needs:
            kept[llm] = input_embedding_copy(model, device)
        if llm in lens_needed:
            lenses[llm] = Lens.from_model(model, device)
        for group in run_passes(
            model, [(i, passes[i]) for i in todo], embeddings, prep.tokenized, groups,
            batch_size=settings.batch_size, n_tokens_store=max(prep.tokenized.lengths),
            out_dtype=DTYPES[settings.store_dtype], pad_id=_pad_id(prep.tokenizer),
            skip=lambda i, g: bool(done_pp[i, g].all()),
        ):
            writer.write_region(group.pass_index, group.prompts, group.resid_gltd, group.final_gtd)
            bar.set_description(f"{passes[group.pass_index].name}")
            bar.set_postfix_str(f"{speed.add(group.n_real_tokens):.0f} tok/s")
            bar.update(group.prompts.stop - group.prompts.start)
        embeddings.clear()
        model_ref = weakref.ref(model)
        del model
        release_memory(model_ref)
    for source in sorted(lens_needed - lenses.keys()):  # an unembedding whose LLM ran no pass
        model = load_model(refs[source], resolved.dtype, resolved.device, None, settings.trust_remote_code,
                           **settings.load_kwargs())
        lenses[source] = Lens.from_model(model)
        model_ref = weakref.ref(model)
        del model
        release_memory(model_ref)
    return lenses


def _save_lenses(writer: StoreWriter, lenses: dict[str, Lens]) -> dict:
    """Write each unembedding's parameters; return what the attributes record of them."""
    record = {}
    for index, source in enumerate(sorted(lenses)):
        lens = lenses[source]
        try:
            norm = describe_norm(lens.norm)
        except ValueError as exc:
            detail = f"--save-lens cannot store this model's lens: {exc}; capture without --save-lens"
            raise UsageError(detail) from None
        bias = lens.bias_v if lens.bias_v is not None else torch.zeros(lens.vocab)
        writer.write_saved_lens(index, lens.weight_vd.float().cpu(), bias.cpu(), norm["weight"], norm["bias"])
        record[source] = {"norm_kind": norm["kind"], "norm_eps": norm["eps"], "logit_multiplier": lens.multiplier,
                          "logit_softcap": lens.softcap}
    return record


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _run_capture(settings: CaptureSettings, log, progress: bool) -> Path:
    prep = _prepare(settings, log)
    try:
        return _capture_into_store(prep, settings, log, progress)
    except ResdiffError:
        raise
    except OSError as exc:  # ENOSPC, EDQUOT, EROFS, EACCES... from the store's writes
        reason = f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, 'no errno')})"
        raise StoreWriteError.from_template("store_write", path=prep.path, reason=reason) from None


def _capture_into_store(prep: _Prepared, settings: CaptureSettings, log, progress: bool) -> Path:
    from tqdm.auto import tqdm

    writer = _open_or_create(prep.path, settings, prep.fingerprint, lambda: _make_template(prep))
    stored_chunk = writer.attrs.get("chunking", {}).get("prompt", prep.chunking.prompt)
    groups = write_groups(len(prep.tokenized.texts), stored_chunk, settings.batch_size)
    done_pp, lens_done = writer.done_pp(), writer.lens_done()
    lens_saved = not settings.save_lens or "saved_lens" in writer.attrs
    if done_pp.all() and lens_done.all() and lens_saved:
        log(f"{prep.path} is already complete; nothing to do (pass --overwrite to capture again)")
        return prep.path
    total = int(sum(g.stop - g.start for i in range(len(prep.passes)) for g in groups if not done_pp[i, g].all()))
    bar = tqdm(total=total, unit="prompt", desc="capture", disable=not progress, leave=True)
    lenses = _residual_stage(prep, writer, groups, bar)
    bar.close()
    if settings.save_lens and "saved_lens" not in writer.attrs:
        writer.finalize({"saved_lens": _save_lenses(writer, lenses)})
    if settings.lens and not lens_done.all():
        bar = tqdm(total=int((~lens_done).sum()), unit="prompt", desc="lens statistics", disable=not progress)
        write_lens_statistics(
            writer, [lenses[p.unembedding] for p in prep.passes], [(q.left, q.right) for q in prep.pairs],
            prep.fingerprint["top_k"], prep.tracked[0], groups, device=prep.resolved.device,
            on_group=lambda g: bar.update(g.stop - g.start),
        )
        bar.close()
    writer.finalize({"completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return prep.path
