"""``capture --plan``: the pass schedule, store size and predicted peak memory, before any weights load.

The plan walks the same schedule as ``capture.pipeline.job`` (one model resident at a time, then
the statistics stage) and adds up, per step, what :mod:`capture.plan.budget` says is
resident. The peak is the process's current footprint (measured after the model code
and, on the CPU, the statistics kernels are loaded) plus the largest step. It is what
``capture --max-memory`` compares against before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from capture.errors import MemoryBudgetExceeded
from capture.lens.stage import statistics_blocks
from capture.plan.batching import compute_batches
from capture.plan.budget import (
    CPU_RUNTIME_SLACK,
    ModelFootprint,
    forward_activations,
    group_buffers,
    model_footprint,
    process_baseline,
    resident_embedding,
    resident_weights,
    statistics_working_set,
)
from capture.plan.prepare import Prepared, make_template, prepare
from capture.plan.residency import residency_schedule
from capture.plan.timing import Calibration, StageTimes, calibrate, estimate, format_seconds
from capture.settings import CaptureSettings
from store import units
from store.chunking import chunk_slices, store_groups, token_extent
from store.units import format_bytes


@dataclass
class PlanStep:
    """One step of the capture and the bytes resident during it, by part."""

    title: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.parts.items() if size)
        return f"{self.title}: {format_bytes(self.total)} ({parts})"


@dataclass
class CapturePlan:
    """What ``capture`` will do and need, from configs alone."""

    label: str
    store: str
    device: str
    n_prompts: int
    n_tokens: int
    baseline: int
    steps: list[PlanStep]
    store_bytes: dict[str, int]
    times: StageTimes | None = None
    calibration: Calibration | None = None
    generation: str | None = None  # with --generate: what the counts above assume of the responses
    carried: int = 0  # with --cross-layers: bytes of the carried states kept beside the store

    @property
    def largest(self) -> PlanStep:
        return max(self.steps, key=lambda step: step.total)

    @property
    def peak(self) -> int:
        return self.baseline + self.largest.total

    def describe(self) -> str:
        where = "CUDA memory (allocated)" if self.device.startswith("cuda") else "process memory (RSS)"
        lines = [f"capture plan for {self.label}: {self.n_prompts} prompts, up to {self.n_tokens} tokens, "
                 f"device {self.device}"]
        if self.generation:
            lines.append(f"  {self.generation}")
        lines += [f"  {i}. {step.describe()}" for i, step in enumerate(self.steps, 1)]
        total = sum(self.store_bytes.values())
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.store_bytes.items() if v)
        lines.append(f"store: {self.store}, at most {format_bytes(total)} before compression ({parts})")
        if self.carried:
            lines.append(f"carried states: {format_bytes(self.carried)} beside the store (the crossed passes' "
                         "starting points, in the compute dtype), removed once they are done")
        lines.append(f"predicted peak {where}: {format_bytes(self.peak)} = {format_bytes(self.baseline)} in use "
                     f"now + step {self.steps.index(self.largest) + 1} ({format_bytes(self.largest.total)})")
        if self.times is not None and self.calibration is not None:
            t = self.times
            stats = f", lens statistics ~{format_seconds(t.statistics)}" if t.statistics else ""
            lines.append(f"predicted time: residuals ~{format_seconds(t.residuals)} (forwards "
                         f"~{format_seconds(t.forwards)}, writes ~{format_seconds(t.writes)}){stats}; total "
                         f"~{format_seconds(t.total)}, model loading extra (calibrated here: "
                         f"{self.calibration.describe()})")
            if t.statistics > 2 * t.residuals:
                lines.append("  the lens statistics dominate: --lens-layers (e.g. -1, the last layer) computes them "
                             "on fewer layers, --no-lens skips them")
        return "\n".join(lines)

    def check(self, limit: int | None, as_given: str = "") -> None:
        """Raise :class:`MemoryBudgetExceeded` when the predicted peak is over ``limit``."""
        if limit is not None and self.peak > limit:
            raise MemoryBudgetExceeded(peak=format_bytes(self.peak), limit=as_given or format_bytes(limit),
                step=self.largest.describe(), baseline=format_bytes(self.baseline))


def _warm_statistics_kernels() -> None:
    """Load the compiled statistics kernels now, so that the measured baseline includes them."""
    from capture.lens.logit_lens import Lens, lens_statistics

    lens = Lens(weight_vd=torch.zeros(64, 8), norm=torch.nn.Identity())
    lens_statistics([torch.zeros(2, 8)] * 2, [lens] * 2, [(0, 1)], 2, [], 32)


def _lens_bytes(fp: ModelFootprint, itemsize: int) -> int:
    return fp.vocab * fp.hidden * itemsize


@dataclass(frozen=True)
class _Shapes:
    """The compute batches (prompts, tokens) and the largest write group (prompts, token extent) of a capture."""

    batches: list[tuple[int, int]]
    group: tuple[int, int]
    kept_layers: int


def _groups_and_batches(prep: Prepared) -> tuple[list[slice], list[tuple[int, int]]]:
    """The write groups and the (prompts, padded length) of every compute batch of one pass, as the capture
    job forms them (``write_groups``, ``compute_batches``)."""
    settings, lengths, device = prep.settings, prep.tokenized.lengths, prep.resolved.device
    size = settings.batch_size_for(device)
    chunking = {"prompt": prep.chunking.prompt, "shard": prep.chunking.shard}
    groups = store_groups(lengths, chunking, size, settings.batch_tokens)
    batches = [(b.stop - b.start, lengths[b.start]) for g in groups
               for b in compute_batches(lengths, g, size, settings.batch_tokens, settings.padding_for(device))]
    return groups, batches


def _shapes(prep: Prepared) -> _Shapes:
    """The batch shapes and the largest write group of the capture (:func:`_groups_and_batches`)."""
    lengths, stored = prep.tokenized.lengths, np.asarray(prep.window.lengths)
    groups, batches = _groups_and_batches(prep)
    n_tokens = max(prep.window.lengths)
    extents = [(g.stop - g.start, max(token_extent(stored, rows, prep.chunking.token, n_tokens)
                                      for rows in chunk_slices(len(lengths), prep.chunking.prompt, g.start, g.stop)))
               for g in groups]
    return _Shapes(sorted(set(batches)), max(extents, key=lambda e: e[0] * e[1]), len(prep.window.layers))


def _residual_steps(prep: Prepared, fps: dict[str, ModelFootprint], on_cpu: bool, shapes: _Shapes) -> list[PlanStep]:
    """Price each step of the residency schedule the capture job executes."""
    passes, settings = prep.passes, prep.settings
    itemsize = units.itemsize(prep.resolved.dtype)
    out_itemsize = units.itemsize(settings.store_dtype)
    lenses: dict[str, int] = {}
    kept: dict[str, int] = {}
    steps = []
    for residency in residency_schedule(passes, prep.lens_sources):
        llm, fp = residency.llm, fps[residency.llm]
        step = PlanStep(residency.describe(passes), {"weights": resident_weights(fp)})
        if residency.copy_lens:
            lenses[llm] = _lens_bytes(fp, itemsize)
        if residency.lens_only:
            step.parts["lens weights"] = sum(lenses.values())
            steps.append(step)
            continue
        step.parts["other input embeddings"] = sum(resident_embedding(fps[o]) for o in residency.borrowed)
        touched = set()  # vocabulary-sized weights of this model read in full (copied) in this step
        if residency.copy_lens:
            # On the CPU the lens copies the head (so the checkpoint mapping can go); on CUDA it is a view.
            touched.add("head" if fp.head else "embedding")
        if residency.keep_embedding:  # shared with a tied lens, else read again from the checkpoint
            kept[llm] = 0 if (fp.head == 0 and llm in lenses) else resident_embedding(fp)
        if fp.mapped:
            step.parts["weights"] += sum(getattr(fp, name) for name in touched)
        step.parts["kept input embeddings"] = sum(kept.values())
        step.parts["lens weights"] = sum(v for k, v in lenses.items() if on_cpu or k != llm)
        step.parts["activations"] = max(forward_activations(fp, rows, tokens, out_itemsize, itemsize, on_cpu,
                                                            shapes.kept_layers) for rows, tokens in shapes.batches)
        if on_cpu:
            step.parts["write buffers"] = group_buffers(fp, *shapes.group, out_itemsize, shapes.kept_layers)
            step.parts["runtime slack"] = CPU_RUNTIME_SLACK
        carried = _carried_states(prep, residency, fp, itemsize, out_itemsize, shapes)
        if carried:
            step.parts["carried states"] = carried
        steps.append(step)
    return steps


def _carried_states(prep: Prepared, residency, fp: ModelFootprint, itemsize: int, out_itemsize: int,
                    shapes: _Shapes) -> int:
    """``--cross-layers``: a step's states at split layers in the compute dtype, a batch's and a write
    group's worth for the splits its passes carry; for its crossed passes a batch's states read back and a
    group's stored lower layers read from the store (at most all its kept layers)."""
    per_token = fp.hidden * itemsize
    splits = max([sum(1 for s, _ in residency.carry if s == i) for i in residency.passes] or [0])
    batch = max(rows * tokens for rows, tokens in shapes.batches)
    group = shapes.group[0] * shapes.group[1]
    carried = per_token * splits * (batch + group)
    if any(prep.passes[i].crossed for i in residency.passes):
        carried += per_token * batch + group * (shapes.kept_layers or fp.n_layers + 1) * fp.hidden * out_itemsize
    return carried


def carried_bytes(prep: Prepared) -> int:
    """Bytes of the states ``--cross-layers`` keeps beside the store until its crossed passes are done."""
    sources = {(i, p.split) for i, p in enumerate(prep.passes) if p.crossed}
    return len(sources) * sum(prep.tokenized.lengths) * prep.shapes["base"].hidden * units.itemsize(prep.resolved.dtype)


def _statistics_step(prep: Prepared, fp: ModelFootprint, on_cpu: bool, shapes: _Shapes) -> PlanStep:
    settings = prep.settings
    itemsize = units.itemsize(prep.resolved.dtype)
    store_itemsize = units.itemsize(settings.store_dtype)
    work = statistics_working_set(
        fp, len(prep.passes), len(prep.pass_pairs), *shapes.group, store_itemsize, prep.fingerprint["top_k"],
        len(prep.tracked[0]), *statistics_blocks(prep.resolved.device), kept_layers=shapes.kept_layers)
    if on_cpu:
        work["runtime slack"] = CPU_RUNTIME_SLACK
    else:  # residuals and results stay in host memory; the device holds one block
        work = {"logits": work["logits"]}
    lens = sum(_lens_bytes(fp, itemsize) for _ in prep.lens_sources)
    return PlanStep("lens statistics", {"lens weights": lens, **work})


def _store_bytes(prep: Prepared) -> dict[str, int]:
    """Bytes before compression of what the capture writes: chunks holding only padding are never written."""
    from store.reader import stored_bytes

    template = make_template(prep, sizing=True)
    sizes = {"residuals": 0, "lens statistics": 0, "other": 0}
    for name, var in template.variables.items():
        size = stored_bytes(template, [name]) if name in template.data_vars else \
            var.size * (16 if var.dtype == object else var.dtype.itemsize)
        kind = "residuals" if name in ("resid", "final") else "other" if name in template.coords else "lens statistics"
        sizes[kind] += size
    return sizes


def build_plan(prep: Prepared, calibrated: bool = False) -> CapturePlan:
    """The plan of the capture ``prep`` describes; reads configs and checkpoint headers only. ``calibrated``
    adds each stage's time from about a second of measurements on this machine (``--plan`` prints it)."""
    resolved = prep.resolved
    on_cpu = not resolved.device.startswith("cuda")
    fps = {llm: model_footprint(ref, resolved.dtype, resolved.device, prep.settings.trust_remote_code)
           for llm, ref in prep.refs.items()}
    shapes = _shapes(prep)
    steps = _residual_steps(prep, fps, on_cpu, shapes)
    if prep.settings.lens:
        steps.append(_statistics_step(prep, fps["base"], on_cpu, shapes))
        if on_cpu:
            _warm_statistics_kernels()
    store_bytes = _store_bytes(prep)
    baseline = process_baseline(resolved.device)  # before the calibration, whose buffers are not the capture's
    calibration, times = _times(prep, fps["base"], store_bytes) if calibrated else (None, None)
    return CapturePlan(
        label=resolved.label, store=str(prep.path), device=resolved.device, n_prompts=len(prep.tokenized.texts),
        n_tokens=max(prep.tokenized.lengths), baseline=baseline, steps=steps,
        store_bytes=store_bytes, times=times, calibration=calibration, generation=_generation_line(prep),
        carried=carried_bytes(prep),
    )


def _generation_line(prep: Prepared) -> str | None:
    """What ``--plan`` counts of responses not generated yet: each at its longest."""
    gen = prep.generation
    if gen is None:
        return None
    prompts, total = sum(prep.source.lengths), sum(prep.tokenized.lengths)
    decoding = f"sampled at temperature {gen.temperature}" if gen.sampling else "greedy"
    return (f"responses: up to {gen.new_tokens} new tokens per prompt by the {gen.model} model ({decoding}), "
            f"generated before the passes; counted at their longest: {prompts} prompt + {total - prompts} response "
            f"tokens (generation itself holds one model and its KV cache, less than a pass step)")


def _times(prep: Prepared, fp: ModelFootprint, store_bytes: dict[str, int]) -> tuple[Calibration, StageTimes]:
    """Each stage's seconds from a short calibration of this machine (:mod:`capture.plan.timing`)."""
    from pathlib import Path

    from capture.models.loading import DTYPES
    from store.location import is_url

    settings, resolved = prep.settings, prep.resolved
    _, batches = _groups_and_batches(prep)
    block_rows, vocab_chunk = statistics_blocks(resolved.device)
    store_dir = Path(".") if is_url(prep.path) else Path(str(prep.path)).resolve().parent
    calibration = calibrate(fp.hidden, fp.ffn, vocab_chunk, block_rows, resolved.device, DTYPES[resolved.dtype],
                            store_dir)
    rows = sum(prep.window.lengths) * len(prep.fingerprint["lens_layers"]) * 2 if settings.lens else 0
    times = estimate(calibration, body_params=fp.body // units.itemsize(resolved.dtype), n_layers=fp.n_layers,
                     hidden=fp.hidden, vocab=fp.vocab, batches=batches, n_passes=len(prep.passes),
                     store_bytes=store_bytes["residuals"], statistics_rows=rows)
    return calibration, times


def plan_capture(settings: CaptureSettings, log=print) -> CapturePlan:
    """Validate ``settings`` as ``capture`` would and return its plan with stage times, loading no weights."""
    return build_plan(prepare(settings, log), calibrated=True)
