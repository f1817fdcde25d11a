"""The residency schedule: which model is loaded at each step of a capture, and what else it holds.

Computed once from the pass plan, and then executed by the capture job
(``capture.pipeline.job``), priced by the memory plan (``capture.plan.memory``) and submitted by
the cluster path (``capture.pipeline.distributed``), so the three cannot drift apart.

One LLM is resident at a time (base first, then SFT). A step runs that LLM's passes;
the input embeddings its passes read are the LLM's own, ones kept from an earlier step,
or other models' embeddings read on their own from their checkpoints ("borrowed"). A
model whose embedding a later step reads keeps it after the model is freed. A model
whose unembedding the lens statistics (or ``--save-lens``) need has its lens copied
while it is resident; an unembedding no pass's LLM provides gets a lens-only step.
"""

from __future__ import annotations

from dataclasses import dataclass

from capture.plan.passes import Pass, schedule, source_pass


@dataclass(frozen=True)
class ResidencyStep:
    """One model resident, what it runs and what it holds."""

    llm: str
    passes: tuple[int, ...]  # indices into the pass plan; empty for a lens-only step
    reads: frozenset[str]  # embedding sources the step's passes read
    borrowed: frozenset[str]  # other models' embeddings read from their checkpoints for this step
    kept: frozenset[str]  # embeddings of earlier models held during this step (this one's too, if kept)
    keep_embedding: bool  # this model's input embedding outlives it, for a later step
    copy_lens: bool  # this model's lens is copied while it is resident
    carry: tuple[tuple[int, int], ...] = ()  # (pass, split): states at a split that later crossed passes continue

    @property
    def lens_only(self) -> bool:
        return not self.passes

    def describe(self, passes: tuple[Pass, ...]) -> str:
        if self.lens_only:
            return f"{self.llm} model, lens only"
        return f"{self.llm} model, passes {', '.join(passes[i].name for i in self.passes)}"


def residency_schedule(passes: tuple[Pass, ...], lens_sources: set[str] | frozenset[str] = frozenset()
                       ) -> list[ResidencyStep]:
    """The steps of a capture of ``passes`` whose lens statistics need the unembeddings ``lens_sources``.

    >>> from capture.plan.passes import DEFAULT_PASSES
    >>> [(s.llm, s.passes, sorted(s.borrowed), s.keep_embedding) for s in residency_schedule(DEFAULT_PASSES)]
    [('base', (0, 2), ['sft'], True), ('sft', (1, 3), [], False)]
    >>> from capture.plan.passes import crossed_passes
    >>> [(s.llm, s.passes, s.carry) for s in residency_schedule(DEFAULT_PASSES + crossed_passes([2]))]
    [('base', (0, 2), ((0, 2),)), ('sft', (1, 3, 4), ((3, 2),)), ('base', (5,), ())]
    """
    by_llm = schedule(passes)
    steps: list[ResidencyStep] = []
    kept: set[str] = set()
    # a crossed pass reads no input embedding: it continues its source pass's state, carried from its step
    carries = {(source_pass(passes, p), p.split) for p in passes if p.crossed}
    for position, (llm, indices) in enumerate(by_llm):
        reads = {passes[i].embedding for i in indices if not passes[i].crossed}
        later = {passes[i].embedding for _, rest in by_llm[position + 1:] for i in rest if not passes[i].crossed}
        keep = llm in later
        steps.append(ResidencyStep(
            llm=llm, passes=tuple(indices), reads=frozenset(reads), borrowed=frozenset(reads - {llm} - kept),
            kept=frozenset(kept | ({llm} if keep else set())), keep_embedding=keep, copy_lens=llm in lens_sources,
            carry=tuple(sorted(c for c in carries if c[0] in indices))))
        if keep:
            kept.add(llm)
    for source in sorted(set(lens_sources) - {step.llm for step in steps}):
        steps.append(ResidencyStep(llm=source, passes=(), reads=frozenset(), borrowed=frozenset(),
                                   kept=frozenset(kept), keep_embedding=False, copy_lens=True))
    return steps
