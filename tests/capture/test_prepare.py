"""What a capture derives before loading weights: the fingerprint and the recorded settings."""

from __future__ import annotations

import json

from capture.plan.prepare import make_template, prepare
from capture.settings import CaptureSettings


def _attrs(tiny_pair, prompts: list[str], **extra) -> dict:
    settings = CaptureSettings(cache_dir=str(tiny_pair[2]), prompts=prompts, **extra)
    return make_template(prepare(settings, log=lambda msg: None)).attrs


def test_attributes_do_not_grow_with_the_number_of_prompts(tiny_pair):
    few = _attrs(tiny_pair, [f"Prompt number {i}." for i in range(10)])
    many = _attrs(tiny_pair, [f"Prompt number {i}." for i in range(2000)])
    size = {name: len(json.dumps(attrs, default=str)) for name, attrs in (("few", few), ("many", many))}
    assert abs(size["many"] - size["few"]) < 64, size
    assert many["content_fingerprint"]["n_prompts"] == 2000
    assert many["capture_settings"]["prompts"]["count"] == 2000
    assert few["content_fingerprint"]["prompt_texts_sha256"] != many["content_fingerprint"]["prompt_texts_sha256"]


def test_recorded_settings_name_the_model_pair_only_when_one_was_used(tiny_pair):
    assert _attrs(tiny_pair, ["Yes"])["capture_settings"]["model_pair"] == "tiny"
    base, sft = tiny_pair[0], tiny_pair[1]
    custom = _attrs(tiny_pair, ["Yes"], base=base, sft=sft)
    assert custom["capture_settings"]["model_pair"] is None and custom["capture_settings"]["base"] == base
