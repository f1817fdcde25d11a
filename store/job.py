"""The capture job: from settings to a complete store, one model resident at a time.

Order of work: validate everything that can be validated without weights (pair,
shapes from configs, passes, prompts and their token lengths), write the template,
then for each LLM (base first): load it, run its passes group by group, write each
region and flag it done, free it. Regions already flagged done are skipped, which
is what makes re-running the same command resume an interrupted capture.
"""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path

import torch

from capture.errors import StoreConflict, UsageError
from capture.models import (
    DTYPES,
    check_compatible,
    input_embedding_copy,
    load_input_embedding,
    load_model,
    load_tokenizer,
    read_shape,
    release_memory,
)
from capture.plan import parse_passes, schedule
from capture.prompts import collect_prompts, tokenize_prompts
from capture.runner import Throughput, run_passes
from capture.settings import CONTENT_KEYS, CaptureSettings, resolve_models
from store.reader import check_store
from store.schema import LAYER_SEMANTICS, build_template, choose_chunking, write_groups
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
    hf_logging.disable_progress_bar()
    try:
        return _run_capture(settings, log, progress)
    finally:
        hf_logging.enable_progress_bar()


def _run_capture(settings: CaptureSettings, log, progress: bool) -> Path:
    from tqdm.auto import tqdm

    # Cheap checks first, so that bad input fails before any model is built or read.
    passes = parse_passes(settings.passes)
    texts = collect_prompts(settings.prompts_files, settings.prompts)
    resolved = resolve_models(settings)
    refs = {"base": resolved.base_ref, "sft": resolved.sft_ref}
    shapes = {k: read_shape(v, settings.trust_remote_code) for k, v in refs.items()}
    check_compatible(shapes["base"], shapes["sft"])
    tokenizer = load_tokenizer(resolved.tokenizer_ref, settings.trust_remote_code)
    if len(tokenizer) > shapes["base"].vocab:
        raise UsageError(
            f"tokenizer {resolved.tokenizer_ref!r} has {len(tokenizer)} tokens but the models have only "
            f"{shapes['base'].vocab} embedding rows; pass the models' own tokenizer with --tokenizer"
        )
    limit, why = settings.max_tokens, "--max-tokens"
    if limit is None and shapes["base"].max_positions:
        limit, why = shapes["base"].max_positions, "the model's context length"
    tokenized = tokenize_prompts(tokenizer, texts, add_bos=settings.add_bos, chat_template=settings.chat_template,
                                 max_tokens=limit, truncate=settings.truncate, limit_reason=why)

    path = Path(settings.store or f"outputs/{resolved.label}.zarr")
    n_layers1, hidden = shapes["base"].n_layers + 1, shapes["base"].hidden
    itemsize = 2 if settings.store_dtype == "float16" else 4
    n_tokens_store = max(tokenized.lengths)
    chunking = choose_chunking(len(texts), n_layers1, n_tokens_store, hidden, itemsize)
    fingerprint = {
        "base_ref": resolved.base_ref, "sft_ref": resolved.sft_ref, "tokenizer_ref": resolved.tokenizer_ref,
        "passes": [p.to_dict() for p in passes], "prompt_texts": texts, "dtype": resolved.dtype,
        "store_dtype": settings.store_dtype, "add_bos": settings.add_bos, "chat_template": settings.chat_template,
        "max_tokens": settings.max_tokens, "truncate": settings.truncate,
    }

    def make_template():
        attrs = {
            "content_fingerprint": fingerprint,
            "capture_settings": settings.to_dict(),
            "models": {k: _model_record(refs[k], shapes[k], resolved.tokenizer_ref) for k in refs},
            "pair_label": resolved.label, "model_dtype": resolved.dtype, "store_dtype": settings.store_dtype,
            "device": resolved.device, "pass_plan": [p.to_dict() for p in passes],
            "layer_semantics": LAYER_SEMANTICS, "library_versions": _versions(),
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "chunking": {"prompt": chunking.prompt, "layer": chunking.layer},
        }
        return build_template(
            passes=[p.to_dict() for p in passes], texts=texts, token_ids=tokenized.ids,
            token_pieces=tokenized.pieces, n_layers1=n_layers1, hidden=hidden,
            store_dtype=settings.store_dtype, chunking=chunking, attrs=attrs,
        )

    writer = _open_or_create(path, settings, fingerprint, make_template)
    stored_chunk = writer.attrs.get("chunking", {}).get("prompt", chunking.prompt)
    groups = write_groups(len(texts), stored_chunk, settings.batch_size)
    done_pp = writer.done_pp()
    if done_pp.all():
        log(f"{path} is already complete; nothing to do (pass --overwrite to capture again)")
        return path

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=int((~done_pp).sum()), unit="prompt", desc="capture", disable=not progress, leave=True)
    speed = Throughput()
    plan = schedule(passes)
    kept: dict = {}  # input embedding modules of models no longer resident
    for step, (llm, pass_indices) in enumerate(plan):
        todo = [i for i in pass_indices if not done_pp[i].all()]
        later_needs = {passes[i].embedding for _, idx in plan[step + 1:] for i in idx}
        if not todo:  # resumed past this LLM; later passes may still need its embeddings
            if llm in later_needs:
                kept[llm] = load_input_embedding(refs[llm], resolved.dtype, resolved.device, settings.trust_remote_code)
            continue
        bar.set_description(f"load {llm}")
        model = load_model(refs[llm], resolved.dtype, resolved.device, settings.device_map,
                           settings.trust_remote_code)
        device = next(model.parameters()).device
        embeddings = {llm: model.get_input_embeddings(), **kept}
        for other in {passes[i].embedding for i in todo} - embeddings.keys():
            embeddings[other] = load_input_embedding(refs[other], resolved.dtype, device, settings.trust_remote_code)
        if llm in later_needs:
            kept[llm] = input_embedding_copy(model, device)
        for group in run_passes(
            model, [(i, passes[i]) for i in todo], embeddings, tokenized, groups,
            batch_size=settings.batch_size, n_tokens_store=n_tokens_store, out_dtype=DTYPES[settings.store_dtype],
            pad_id=pad_id, skip=lambda i, g: bool(done_pp[i, g].all()),
        ):
            writer.write_region(group.pass_index, group.prompts, group.resid_gltd, group.final_gtd)
            bar.set_description(f"{passes[group.pass_index].name}")
            bar.set_postfix_str(f"{speed.add(group.n_real_tokens):.0f} tok/s")
            bar.update(group.prompts.stop - group.prompts.start - int(done_pp[group.pass_index, group.prompts].sum()))
        embeddings.clear()
        del model
        release_memory()
    bar.close()
    writer.finalize({"completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return path
