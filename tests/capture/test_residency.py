"""The residency schedule that the job executes, the plan prices and the cluster path submits."""

from __future__ import annotations

from capture.plan.passes import DEFAULT_PASSES, parse_passes
from capture.plan.residency import residency_schedule


def test_default_plan_borrows_the_sft_embedding_then_keeps_the_base_one():
    base, sft = residency_schedule(DEFAULT_PASSES, {"base", "sft"})
    assert (base.llm, base.passes, base.borrowed, base.keep_embedding, base.copy_lens) == (
        "base", (0, 2), frozenset({"sft"}), True, True)
    assert (sft.llm, sft.passes, sft.reads, sft.borrowed, sft.kept) == (
        "sft", (1, 3), frozenset({"base", "sft"}), frozenset(), frozenset({"base"}))


def test_an_unembedding_no_pass_runs_gets_a_lens_only_step():
    passes = parse_passes("BSb=sft:base:base")  # the SFT LLM read out by the base unembedding
    steps = residency_schedule(passes, {p.unembedding for p in passes})
    assert [(s.llm, s.lens_only, s.copy_lens) for s in steps] == [("sft", False, False), ("base", True, True)]
    assert steps[0].borrowed == frozenset({"base"}) and not steps[0].keep_embedding


def test_no_lens_statistics_copy_no_lens():
    assert not any(s.copy_lens for s in residency_schedule(DEFAULT_PASSES))
