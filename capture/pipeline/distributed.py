"""Capture on a dask.distributed cluster: chunk-aligned tasks, models resident on the workers.

The coordinator (the process running ``capture``) writes the template and, for each
LLM in schedule order, submits one task per shard row (format 4; per write group in an
unsharded store) still to do. A task runs that LLM's passes over its row, group by group,
and writes the row's shards whole, with their done flags, straight into the shared store;
no two tasks touch a shard or a flag chunk.
Each worker keeps the model it last loaded (and the other model's input embedding) in
a worker plugin (:class:`ResidentModel`), so it loads each model once per phase however
many tasks it runs; unregistering the plugin at the end frees it.
The coordinator then loads the lenses, runs the statistics stage and finalises the
store, as a single-process capture does; a re-run resumes from the done flags.

Tasks ask for ``resources={"GPU": 1}`` when the device is CUDA: start one worker per
GPU with ``--resources GPU=1`` (``dask worker``) or use dask-cuda's LocalCUDACluster.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

from distributed import as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from capture.inputs.prompts import TokenizedPrompts
from capture.inputs.selection import StoredWindow
from capture.lens.logit_lens import lens_head, record_lens_head
from capture.models.loading import DTYPES, load_input_embedding, load_model, release_memory
from capture.pipeline.runner import run_passes
from capture.plan.passes import Pass
from capture.plan.prepare import Prepared, pad_id_of
from capture.plan.residency import residency_schedule
from store.chunking import shard_rows, store_groups
from store.location import current_storage_options
from store.schema import LensHead
from store.writer import StoreWriter

PLUGIN_NAME = "resdiff-resident-model"


@dataclass(frozen=True)
class GroupTask:
    """Everything a worker needs to capture one LLM's passes over one write group."""

    store: str
    llm_ref: str
    passes: tuple[tuple[int, Pass], ...]
    embedding_refs: dict[str, str]  # embedding source -> model reference, for the passes' other sources
    ids: list[list[int]]  # what each forward sees, in store order
    window: StoredWindow
    group: slice
    batch_size: int
    batch_tokens: int
    max_padding: float
    store_dtype: str
    pad_id: int
    dtype: str
    device: str
    trust_remote_code: bool
    allow_pickle: bool
    load_kwargs: dict
    storage_options: dict  # for a store at an fsspec URL: the coordinator's options
    lens_head: bool = False  # also report the model's lens head (its unembedding is one the passes use)


class ResidentModel(WorkerPlugin):
    """Worker plugin holding one model per worker process (and the other models' input embeddings).

    The coordinator
    registers one per capture and unregisters it at the end, which frees the model.
    A task loads a model only when it differs from the one held.
    """

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model = None
        self.embeddings: dict = {}

    def teardown(self, worker) -> None:
        self.release()

    def release(self) -> None:
        if self.model is None:
            return
        model_ref = weakref.ref(self.model)
        self.key, self.model, self.embeddings = None, None, {}
        release_memory(model_ref)

    def model_for(self, task: GroupTask):
        key = (task.llm_ref, task.dtype, task.device)
        if self.key != key:
            self.release()
            self.model = load_model(task.llm_ref, task.dtype, task.device, None, task.trust_remote_code,
                                    **task.load_kwargs)
            self.key = key
        return self.model

    def embedding_for(self, ref: str, task: GroupTask, device):
        if ref not in self.embeddings:
            self.embeddings[ref] = load_input_embedding(ref, task.dtype, device, task.trust_remote_code,
                                                        task.allow_pickle)
        return self.embeddings[ref]


def capture_group(task: GroupTask) -> tuple[int, bool, LensHead | None]:
    """Run on a worker: capture and write the task's regions not yet done.

    Returns the real tokens written, whether the worker had to load the model, and (``task.lens_head``) the
    model's lens head for the coordinator to record.
    """
    resident = get_worker().plugins[PLUGIN_NAME]
    loaded = resident.key != (task.llm_ref, task.dtype, task.device)
    model = resident.model_for(task)
    device = next(model.parameters()).device
    embeddings = {source: model.get_input_embeddings() if ref == task.llm_ref else
                  resident.embedding_for(ref, task, device) for source, ref in task.embedding_refs.items()}
    with StoreWriter(task.store, task.storage_options) as writer:
        done_pp = writer.done_pp()
        lengths = [len(ids) for ids in task.ids[task.group]]
        groups = [slice(g.start + task.group.start, g.stop + task.group.start)  # in order: the row's last one writes it
                  for g in store_groups(lengths, {**writer.attrs["chunking"], "shard": None}, task.batch_size,
                                        task.batch_tokens)]
        tokens = 0
        for captured in run_passes(
            model, list(task.passes), embeddings, TokenizedPrompts(texts=[], ids=task.ids), groups, task.window,
            batch_size=task.batch_size, batch_tokens=task.batch_tokens, max_padding=task.max_padding,
            token_extent=writer.group_extent,
            out_dtype=DTYPES[task.store_dtype],
            pad_id=task.pad_id, skip=lambda i, g: bool(done_pp[i, g].all()),
        ):
            writer.write_region(captured.pass_index, captured.prompts, captured.resid_gltd, captured.final_gtd)
            tokens += captured.n_real_tokens
    return tokens, loaded, lens_head(model) if task.lens_head else None


def residual_stage_on_cluster(prep: Prepared, writer: StoreWriter, groups: list[slice], bar, client,
                              log=print) -> None:
    """Capture every region not yet done on ``client``'s cluster: one task per shard row (a task writes its
    row's shards whole; format 4) or per write group (``groups``) of an unsharded store. CUDA tasks ask for
    the worker resource ``GPU=1``."""
    settings, resolved, passes = prep.settings, prep.resolved, prep.passes
    if settings.device_map:
        log("note: --device-map is ignored on a cluster; each worker loads whole models on its own device")
    on_gpu = resolved.device.startswith("cuda")
    try:
        client.register_plugin(ResidentModel(), name=PLUGIN_NAME)
        n_workers = len(client.scheduler_info()["workers"])
        log(f"capturing on dask.distributed at {client.scheduler.address} ({n_workers} workers)")
        done_pp = writer.done_pp()
        if writer.attrs["chunking"].get("shard"):
            groups = shard_rows(len(prep.tokenized.ids), writer.attrs["chunking"])
        loads, tasks_run = 0, []
        for step in residency_schedule(passes):
            llm, pass_indices = step.llm, step.passes
            bar.set_description(f"{llm} on {n_workers} workers")
            specs = tuple((i, passes[i]) for i in pass_indices)
            sources = step.reads
            tasks = [
                GroupTask(
                    store=str(prep.path), llm_ref=prep.refs[llm], passes=specs,
                    embedding_refs={s: prep.refs[s] for s in sources}, ids=prep.tokenized.ids, window=prep.window,
                    group=group, batch_size=settings.batch_size_for(resolved.device),
                    batch_tokens=settings.batch_tokens,
                    max_padding=settings.padding_for(resolved.device),
                    store_dtype=settings.store_dtype, pad_id=pad_id_of(prep.tokenizer), dtype=resolved.dtype,
                    device=resolved.device, trust_remote_code=settings.trust_remote_code,
                    allow_pickle=settings.allow_pickle, load_kwargs=settings.load_kwargs(),
                    storage_options=current_storage_options(),
                    lens_head=llm in prep.lens_sources and llm not in (writer.attrs.get("lens_heads") or {}),
                )
                for group in groups if not all(done_pp[i, group].all() for i in pass_indices)
            ]
            tasks_run.append(len(tasks))
            futures = [client.submit(capture_group, task, pure=False, resources={"GPU": 1} if on_gpu else None)
                       for task in tasks]
            size_of = {f.key: sum(int((~done_pp[i, t.group]).sum()) for i in pass_indices)
                       for f, t in zip(futures, tasks, strict=True)}
            for future in as_completed(futures):
                _, loaded, head = future.result()  # re-raises a worker's error here
                loads += loaded
                record_lens_head(writer, llm, head)
                bar.update(size_of[future.key])
        log(f"cluster capture done: {sum(tasks_run)} tasks, {loads} model loads on {n_workers} workers")
    finally:
        with contextlib.suppress(Exception):  # best effort: a broken connection must not hide the real error
            client.unregister_worker_plugin(PLUGIN_NAME)  # teardown frees each worker's model
