"""Capture on a dask.distributed cluster: chunk-aligned tasks, models resident on the workers.

The coordinator (the process running ``capture``) writes the template and, for each
LLM in schedule order, submits one task per write group still to do. A task runs that
LLM's passes over its group and writes the regions, with their done flags, straight
into the shared store; groups are whole store chunks, so no two tasks touch a chunk.
Each worker keeps the model it last loaded (and the other model's input embedding) in
a process-wide slot, so it loads each model once per phase however many tasks it runs.
The coordinator then loads the lenses, runs the statistics stage and finalises the
store, as a single-process capture does; a re-run resumes from the done flags.

Tasks ask for ``resources={"GPU": 1}`` when the device is CUDA: start one worker per
GPU with ``--resources GPU=1`` (``dask worker``) or use dask-cuda's LocalCUDACluster.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from capture.models import DTYPES, load_input_embedding, load_model, release_memory
from capture.plan import Pass, schedule
from capture.prompts import TokenizedPrompts
from capture.runner import run_passes
from store.location import STORAGE_OPTIONS
from store.prepare import Prepared, pad_id_of
from store.writer import StoreWriter

# One model per worker process: {"key": (ref, dtype, device), "model": module, "embeddings": {ref: module}}.
_RESIDENT: dict = {}


@dataclass(frozen=True)
class GroupTask:
    """Everything a worker needs to capture one LLM's passes over one write group."""

    store: str
    llm_ref: str
    passes: tuple[tuple[int, Pass], ...]
    embedding_refs: dict[str, str]  # embedding source -> model reference, for the passes' other sources
    ids: list[list[int]]
    group: slice
    batch_size: int
    n_tokens_store: int
    store_dtype: str
    pad_id: int
    dtype: str
    device: str
    trust_remote_code: bool
    allow_pickle: bool
    load_kwargs: dict
    storage_options: dict  # for a store at an fsspec URL: the coordinator's options


def _resident(task: GroupTask):
    """The worker's model for ``task``, loading it (and dropping the previous one) only when it changes."""
    key = (task.llm_ref, task.dtype, task.device)
    if _RESIDENT.get("key") != key:
        previous = _RESIDENT.get("model")
        _RESIDENT.clear()
        if previous is not None:
            previous_ref = weakref.ref(previous)
            del previous
            release_memory(previous_ref)
        model = load_model(task.llm_ref, task.dtype, task.device, None, task.trust_remote_code, **task.load_kwargs)
        _RESIDENT.update(key=key, model=model, embeddings={})
    return _RESIDENT["model"]


def capture_group(task: GroupTask) -> int:
    """Run on a worker: capture and write the task's regions not yet done; return the real tokens written."""
    model = _resident(task)
    device = next(model.parameters()).device
    embeddings = {}
    for source, ref in task.embedding_refs.items():
        if ref == task.llm_ref:
            embeddings[source] = model.get_input_embeddings()
            continue
        if ref not in _RESIDENT["embeddings"]:
            _RESIDENT["embeddings"][ref] = load_input_embedding(ref, task.dtype, device, task.trust_remote_code,
                                                                task.allow_pickle)
        embeddings[source] = _RESIDENT["embeddings"][ref]
    writer = StoreWriter(task.store, task.storage_options)
    done_pp = writer.done_pp()
    tokens = 0
    for captured in run_passes(
        model, list(task.passes), embeddings, TokenizedPrompts(texts=[], ids=task.ids), [task.group],
        batch_size=task.batch_size, n_tokens_store=task.n_tokens_store, out_dtype=DTYPES[task.store_dtype],
        pad_id=task.pad_id, skip=lambda i, g: bool(done_pp[i, g].all()),
    ):
        writer.write_region(captured.pass_index, captured.prompts, captured.resid_gltd, captured.final_gtd)
        tokens += captured.n_real_tokens
    return tokens


def _release_worker_models() -> None:
    """Run on each worker at the end: free the resident model."""
    model = _RESIDENT.pop("model", None)
    _RESIDENT.clear()
    if model is not None:
        model_ref = weakref.ref(model)
        del model
        release_memory(model_ref)


def residual_stage_on_cluster(prep: Prepared, writer: StoreWriter, groups: list[slice], bar, log=print) -> None:
    """Capture every region not yet done on the cluster named by ``prep.settings``."""
    from distributed import as_completed

    from store.cluster import connect

    settings, resolved, passes = prep.settings, prep.resolved, prep.passes
    if settings.device_map:
        log("note: --device-map is ignored on a cluster; each worker loads whole models on its own device")
    on_gpu = resolved.device.startswith("cuda")
    client, cluster = connect(settings.scheduler, settings.local_cluster,
                              resources={"GPU": 1} if on_gpu and settings.local_cluster else None)
    try:
        n_workers = len(client.scheduler_info()["workers"])
        log(f"capturing on dask.distributed at {client.scheduler.address} ({n_workers} workers)")
        done_pp = writer.done_pp()
        for llm, pass_indices in schedule(passes):
            bar.set_description(f"{llm} on {n_workers} workers")
            specs = tuple((i, passes[i]) for i in pass_indices)
            sources = {passes[i].embedding for i in pass_indices}
            tasks = [
                GroupTask(
                    store=str(prep.path), llm_ref=prep.refs[llm], passes=specs,
                    embedding_refs={s: prep.refs[s] for s in sources}, ids=prep.tokenized.ids, group=group,
                    batch_size=settings.batch_size, n_tokens_store=max(prep.tokenized.lengths),
                    store_dtype=settings.store_dtype, pad_id=pad_id_of(prep.tokenizer), dtype=resolved.dtype,
                    device=resolved.device, trust_remote_code=settings.trust_remote_code,
                    allow_pickle=settings.allow_pickle, load_kwargs=settings.load_kwargs(),
                    storage_options=dict(STORAGE_OPTIONS),
                )
                for group in groups if not all(done_pp[i, group].all() for i in pass_indices)
            ]
            futures = [client.submit(capture_group, task, pure=False, resources={"GPU": 1} if on_gpu else None)
                       for task in tasks]
            size_of = {f.key: sum(int((~done_pp[i, t.group]).sum()) for i in pass_indices)
                       for f, t in zip(futures, tasks, strict=True)}
            for future in as_completed(futures):
                future.result()  # re-raises a worker's error here
                bar.update(size_of[future.key])
        client.run(_release_worker_models)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
