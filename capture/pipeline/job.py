"""The capture job: from settings to a complete store, one model resident at a time.

Order of work: validate everything that can be validated without weights (pair,
shapes from configs, passes, pairs, tracked tokens, prompts and their token lengths),
write the template, then for each LLM (base first): load it, keep its lens, run its
passes group by group, write each region and flag it done (in a background thread,
while the next group computes), free it. With ``--scheduler``/``--local-cluster`` the
groups run as tasks on dask.distributed workers instead (``capture.pipeline.distributed``). Then, with both
lenses in memory, the lens statistics stage (``capture.lens.stage``) reads the stored
residuals back and writes the statistics, again flagged per prompt group. Regions
already flagged done are skipped, which is what makes re-running the same command
resume an interrupted capture.
"""

from __future__ import annotations

import datetime as dt
import errno
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from capture.inputs.responses import Journal, Response, with_responses
from capture.lens.logit_lens import Lens, describe_norm, lens_head, record_lens_head
from capture.lens.stage import chosen_layers, pending_rows, write_lens_statistics
from capture.models.loading import DTYPES, input_embedding_copy, load_input_embedding, load_model, release_memory
from capture.pipeline.carry import carry_needs, crossing_for, group_writer
from capture.pipeline.generate import generate_responses
from capture.pipeline.runner import CapturedGroup, Throughput, run_passes
from capture.plan.memory import build_plan
from capture.plan.prepare import Prepared, arrange, make_template, pad_id_of, prepare
from capture.plan.residency import residency_schedule
from capture.settings import CONTENT_KEYS, CaptureSettings
from store.chunking import store_groups
from store.errors import ResdiffError, StoreConflict, StoreWriteError, UsageError
from store.integrity import leftover_partials
from store.location import StorePath, is_url
from store.lock import store_lock
from store.reader import check_store, has_consolidated_metadata
from store.schema import FORMAT_ATTR, FORMAT_VERSION, LensHead
from store.target import WriteMode, claim
from store.units import parse_size
from store.writer import StoreWriter, remove_store


def _short(value, width: int = 70) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _diff(old: dict, new: dict) -> str:
    """The settings that differ, each value cut short on its own (both sides stay readable)."""
    keys = [k for k in CONTENT_KEYS if old.get(k) != new.get(k)]
    return ", ".join(f"{k.removesuffix('_sha256')}: differ" if k.endswith("_sha256") else
                     f"{k}: stored {_short(old.get(k))} vs now {_short(new.get(k))}" for k in keys)


def _open_or_create(path: StorePath, settings: CaptureSettings, fingerprint: dict, template) -> StoreWriter:
    state = claim(path, WriteMode.OVERWRITE if settings.overwrite else WriteMode.RESUME)
    if state == "replace":
        remove_store(path)
    elif state == "existing":
        attrs = check_store(path)
        if attrs.get(FORMAT_ATTR) != FORMAT_VERSION:
            raise StoreConflict(f"store {path} has format {attrs.get(FORMAT_ATTR)}, written by an older resdiff; "
                                "it stays readable by every command but a capture cannot resume or extend it: pass "
                                f"--overwrite to capture it again in format {FORMAT_VERSION}, or --store PATH")
        stored = attrs.get("content_fingerprint", {})
        if stored != fingerprint:
            raise StoreConflict(path=path, diff=_diff(stored, fingerprint) or "unknown")
        if not is_url(path):  # a refused write (ENOSPC) or a kill left temporary chunk files: ours to remove now
            for leftover in leftover_partials(Path(path)):
                leftover.unlink(missing_ok=True)
        return StoreWriter(path)
    if not is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return StoreWriter.create(path, template(), codec=settings.codec)


def run_capture(settings: CaptureSettings, *, log=print, progress: bool = True, client=None) -> StorePath:
    """Run a capture described by ``settings`` and return the store path.

    ``client``, a ``distributed.Client``, runs the passes on its cluster's workers (each keeps its model
    loaded); the caller opens and closes it (``cli.py`` does for ``--scheduler`` and ``--local-cluster``)."""
    from transformers.utils import logging as hf_logging

    # transformers' own loading bars would interleave with ours.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _run_capture(settings, log, progress, client)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _lenses_needed(prep: Prepared, writer: StoreWriter) -> set[str]:
    """The unembeddings the rest of the capture still needs (statistics or --save-lens)."""
    status = writer.completeness()
    pending = not status.statistics_complete or status.lens_saved is False
    return prep.lens_sources if pending else set()


def _load_lenses(prep: Prepared, sources: set[str]) -> dict[str, Lens]:
    """Load each model of ``sources`` in turn and keep only its lens."""
    settings, resolved, lenses = prep.settings, prep.resolved, {}
    for source in sorted(sources):
        model = load_model(prep.refs[source], resolved.dtype, resolved.device, None, settings.trust_remote_code,
                           **settings.load_kwargs())
        lenses[source] = Lens.from_model(model)
        model_ref = weakref.ref(model)
        del model
        release_memory(model_ref)
    return lenses


def _residual_stage(prep: Prepared, writer: StoreWriter, groups: list[slice], bar) -> dict[str, Lens]:
    """Execute the residency schedule: every pass not yet done, one model resident at a time.

    Returns the lenses copied on the way (those still needed)."""
    settings, resolved, passes, refs = prep.settings, prep.resolved, prep.passes, prep.refs
    done_pp = writer.done_pp()
    lens_needed = _lenses_needed(prep, writer)
    lenses: dict[str, Lens] = {}
    kept: dict = {}  # input embedding modules of models no longer resident
    speed = Throughput()
    crossing = crossing_for(prep) if any(p.crossed for p in passes) else None
    for step in residency_schedule(passes, prep.lens_sources):
        llm = step.llm
        needs = carry_needs(prep, crossing, step, done_pp, groups)
        todo = [i for i in step.passes if not done_pp[i].all() or needs.get(i)]
        if not todo and llm not in lens_needed:  # resumed past this step (or its lens is not needed)
            if step.keep_embedding:
                kept[llm] = load_input_embedding(refs[llm], resolved.dtype, resolved.device, settings.trust_remote_code,
                                                 settings.allow_pickle)
            continue
        if step.lens_only:
            lenses.update(_load_lenses(prep, {llm}))
            continue
        bar.set_description(f"load {llm}")
        model = load_model(refs[llm], resolved.dtype, resolved.device, settings.device_map,
                           settings.trust_remote_code, **settings.load_kwargs())
        device = next(model.parameters()).device
        embeddings = {llm: model.get_input_embeddings(), **kept}
        for other in step.borrowed & {passes[i].embedding for i in todo if not passes[i].crossed}:
            embeddings[other] = load_input_embedding(refs[other], resolved.dtype, device, settings.trust_remote_code,
                                                     settings.allow_pickle)
        if llm in prep.lens_sources and llm not in (writer.attrs.get("lens_heads") or {}):
            # every capture records each unembedding's head as the loaded model computes it (the analysis
            # reads the checkpoints with it instead of guessing the norm from their config)
            record_lens_head(writer, llm, lens_head(model))
        if llm in lens_needed:
            lenses[llm] = Lens.from_model(model, device)
        if step.keep_embedding:
            kept[llm] = _keep_input_embedding(model, lenses.get(llm), refs[llm], prep, device)
        if crossing is not None:
            crossing.splits_of = {i: tuple(split for source, split in step.carry if source == i) for i in step.passes}
        captured = run_passes(
            model, [(i, passes[i]) for i in todo], embeddings, prep.tokenized, groups, prep.window,
            batch_size=settings.batch_size_for(resolved.device), batch_tokens=settings.batch_tokens,
            max_padding=settings.padding_for(resolved.device), token_extent=writer.group_extent,
            out_dtype=DTYPES[settings.store_dtype], pad_id=pad_id_of(prep.tokenizer),
            skip=lambda i, g, needs=needs: bool(done_pp[i, g].all()) and not needs.get(i, {}).get(g.start),
            crossing=crossing,
        )
        for group in _written_behind(writer, captured, group_writer(writer, prep, crossing)):
            bar.set_description(f"{passes[group.pass_index].name}")
            bar.set_postfix_str(f"{speed.add(group.n_real_tokens):.0f} tok/s")
            bar.update(group.prompts.stop - group.prompts.start)
        embeddings.clear()
        model_ref = weakref.ref(model)
        del model
        release_memory(model_ref)
    if crossing is not None and writer.done_pp().all():
        crossing.carry.discard()  # every crossed pass is written: the carried states are no longer needed
    return lenses


def _written_behind(writer: StoreWriter, captured: Iterator[CapturedGroup],
                    write=None) -> Iterator[CapturedGroup]:
    """Write each group in a background thread while the next one is computed; yield it once written.

    At most one write is in flight, so memory holds two groups. A failed write re-raises
    here; on any exit the write in flight completes (with its done flag) before returning. A written
    group's buffers go back to their pool before it is yielded (its arrays are not to be read). ``write``
    (default: the region) writes one group.
    """
    write = write or (lambda g: writer.write_region(g.pass_index, g.prompts, g.resid_gltd, g.final_gtd))
    with ThreadPoolExecutor(1, thread_name_prefix="resdiff-write") as pool:
        pending: deque = deque()
        for group in captured:
            pending.append((group, pool.submit(write, group)))
            while len(pending) > 1 or (pending and pending[0][1].done()):
                done_group, future = pending.popleft()
                future.result()
                done_group.release()  # its buffers serve a later group
                yield done_group
        while pending:
            done_group, future = pending.popleft()
            future.result()
            done_group.release()
            yield done_group


def _keep_input_embedding(model, lens: Lens | None, ref: str, prep: Prepared, device) -> torch.nn.Module:
    """This model's input embedding for later passes, without another vocabulary-sized copy where possible.

    A tied embedding shares the lens's copy; otherwise it is read again from the
    checkpoint, which on the CPU stays memory-mapped (only the rows looked up count).
    """
    if lens is not None and model.get_input_embeddings().weight is model.get_output_embeddings().weight:
        return input_embedding_copy(model, device, lens.weight_vd)
    settings = prep.settings
    return load_input_embedding(ref, prep.resolved.dtype, device, settings.trust_remote_code, settings.allow_pickle)


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
        record[source] = LensHead(norm["kind"], norm["eps"], lens.multiplier, lens.softcap).attrs()
    return record



def _run_capture(settings: CaptureSettings, log, progress: bool, client) -> StorePath:
    limit = parse_size(settings.max_memory) if settings.max_memory is not None else None
    prep = prepare(settings, log)
    if client is not None and any(p.crossed for p in prep.passes):
        raise UsageError("--cross-layers runs on this machine only for now; drop --scheduler/--local-cluster or "
                         "--cross-layers")
    if limit is not None:
        build_plan(prep).check(limit, str(settings.max_memory))
    try:
        with store_lock(prep.path):  # one writer at a time, from the overwrite or resume to completed_at
            return _capture_into_store(prep, settings, log, progress, client)
    except ResdiffError:
        raise
    except OSError as exc:  # ENOSPC, EDQUOT, EROFS, EACCES... from the store's writes
        reason = f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, 'no errno')})"
        raise StoreWriteError(path=prep.path, reason=reason) from None


def _capture_into_store(prep: Prepared, settings: CaptureSettings, log, progress: bool, client) -> StorePath:
    journal = Journal(prep.path, prep.fingerprint) if prep.generation else None
    if journal is not None and settings.overwrite:
        journal.discard()  # --overwrite generates again too

    def template():
        nonlocal prep
        if journal is not None:  # the store's layout follows the responses: generate them first
            prep = arrange(prep, with_responses(prep.source, generate_responses(prep, journal, log, progress),
                                                prep.tokenizer))
        return make_template(prep)

    with _open_or_create(prep.path, settings, prep.fingerprint, template) as writer:
        if journal is not None:
            if not prep.responded:  # resumed: the responses are the store's own
                prep = arrange(prep, with_responses(prep.source, stored_responses(writer, prep), prep.tokenizer))
            journal.discard()  # the store holds the responses now
        return _fill_store(writer, prep, settings, log, progress, client)


def stored_responses(writer: StoreWriter, prep: Prepared) -> dict[int, Response]:
    """The responses a store holds, by prompt label; its prompts' tokens must be the ones tokenised now."""
    group = writer.group
    labels, starts = np.asarray(group["prompt"][...]), np.asarray(group["response_start"][...])
    ids_pt, n_tokens = np.asarray(group["token_id"][...]), np.asarray(group["n_tokens"][...])
    stops = np.asarray(group["stop_reason"][...])
    found = {}
    for row, label in enumerate(labels.tolist()):
        prompt_ids = ids_pt[row, : starts[row]].tolist()
        if prompt_ids != prep.source.ids[label]:
            raise StoreConflict(path=prep.path, diff=f"prompt {label}'s tokens differ from the stored ones")
        found[label] = Response(ids_pt[row, starts[row]: n_tokens[row]].tolist(), str(stops[row]))
    return found


def _fill_store(writer: StoreWriter, prep: Prepared, settings: CaptureSettings, log, progress: bool,
               client) -> StorePath:
    """Capture what ``writer``'s store still lacks: the residual stage (on ``client``'s cluster when given),
    the saved lens, the statistics, then ``completed_at``."""
    from tqdm.auto import tqdm

    stored = writer.attrs.get("chunking", {"prompt": prep.chunking.prompt})
    groups = store_groups(prep.tokenized.lengths, stored, settings.batch_size_for(prep.resolved.device),
                          settings.batch_tokens)
    status = writer.completeness()
    done_pp, lens_done = writer.done_pp(), writer.lens_done()
    if status.complete:
        if not has_consolidated_metadata(prep.path):  # killed while finishing, by a resdiff before format 3
            writer.finalize({})
            log(f"{prep.path} was complete but lacked its consolidated metadata; repaired")
        log(f"{prep.path} is already complete; nothing to do (pass --overwrite to capture again)")
        return prep.path
    total = int(sum(g.stop - g.start for i in range(len(prep.passes)) for g in groups if not done_pp[i, g].all()))
    bar = tqdm(total=total, unit="prompt", desc="capture", disable=not progress, leave=True)
    if client is not None:
        from capture.pipeline.distributed import residual_stage_on_cluster

        residual_stage_on_cluster(prep, writer, groups, bar, client, log)
        lenses = _load_lenses(prep, _lenses_needed(prep, writer))
    else:
        lenses = _residual_stage(prep, writer, groups, bar)
    bar.close()
    if settings.save_lens and "saved_lens" not in writer.attrs:
        writer.finalize({"saved_lens": _save_lenses(writer, lenses)})
    if settings.lens and not lens_done.all():
        # by rows (position x layer x lens), not prompt groups: a group of long prompts takes minutes on a CPU
        n_lens_layers = int(chosen_layers(writer.group).sum())
        rows = pending_rows(np.asarray(writer.group["n_tokens"][...]), lens_done, n_lens_layers)
        bar = tqdm(total=rows, unit="row", unit_scale=True, desc="lens statistics", disable=not progress)
        write_lens_statistics(
            writer, [lenses[p.unembedding] for p in prep.passes], [(q.left, q.right) for q in prep.pass_pairs],
            prep.fingerprint["top_k"], prep.tracked[0], groups, device=prep.resolved.device, on_rows=bar.update,
        )
        bar.close()
    writer.finalize({"completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return prep.path
