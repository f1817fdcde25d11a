"""Generate, then capture (``capture --generate N``): responses equal transformers' own ``generate`` for each
prompt run alone, sampling is per prompt, the store marks the responses, resume never generates twice, and
bad flags are refused before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from capture.inputs.responses import Generation
from capture.pipeline import generate as gen_mod
from capture.pipeline.generate import generate_batch, prompt_seed, stop_ids
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.errors import UsageError
from tests.helpers import ARCHS, RAGGED, load

QUIET = {"log": lambda *a: None, "progress": False}


def _alone(model, ids: list[int], new: int, stops: list[int]) -> list[int]:
    """transformers' ``generate`` on one prompt (no padding), cut after the first stop token."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=new, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    written = out[0, len(ids):].tolist()
    end = next((i for i, t in enumerate(written) if t in stops), None)
    return written if end is None else written[: end + 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_generation_equals_generate_alone(arch, make_model):
    from transformers import AutoTokenizer

    path = make_model(arch)
    model, tok = load(path), AutoTokenizer.from_pretrained(path)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in RAGGED]
    prompts = [ids for ids in prompts if len(ids) + 10 <= 128]  # (the context: test_context_and_eos_stop_reasons)
    stops = stop_ids(model, tok)
    found = generate_batch(model, prompts, list(range(len(prompts))), Generation(10), stops, tok.pad_token_id, 128)
    for label, ids in enumerate(prompts):
        assert found[label].ids == _alone(model, ids, 10, stops), (arch, label)
        assert found[label].stop == ("eos" if found[label].ids[-1] in stops else "length")


def test_context_and_eos_stop_reasons(make_model):
    from transformers import AutoTokenizer

    path = make_model("llama")
    model, tok = load(path), AutoTokenizer.from_pretrained(path)
    ids = tok(RAGGED[3], add_special_tokens=False)["input_ids"]
    free = generate_batch(model, [ids], [0], Generation(8), [], tok.pad_token_id, None)[0]
    assert free.stop == "length" and len(free.ids) == 8
    stop_at = free.ids[3]  # a token it writes: the response ends with its first occurrence
    ended = generate_batch(model, [ids], [0], Generation(8), [stop_at], tok.pad_token_id, None)[0]
    assert ended.stop == "eos" and ended.ids == free.ids[: free.ids.index(stop_at) + 1]
    cut = generate_batch(model, [ids], [0], Generation(8), [], tok.pad_token_id, len(ids) + 5)[0]
    assert cut.stop == "context" and cut.ids == free.ids[:5]
    full = generate_batch(model, [ids], [0], Generation(8), [], tok.pad_token_id, len(ids))[0]
    assert full.stop == "context" and full.ids == []


def _sampled_reference(model, ids: list[int], new: int, temperature: float, seed: int) -> list[int]:
    """A plain loop: full forward over the sequence so far, softmax at ``temperature``, one draw."""
    generator = torch.Generator().manual_seed(seed)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            probs = torch.softmax(logits / temperature, -1).float()
            seq.append(int(torch.multinomial(probs, 1, generator=generator)))
    return seq[len(ids):]


def test_sampling_is_per_prompt_and_seeded(make_model):
    from transformers import AutoTokenizer

    path = make_model("qwen2")
    model, tok = load(path), AutoTokenizer.from_pretrained(path)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in RAGGED[:3]]
    sampling = Generation(12, temperature=1.5, seed=7)
    batched = generate_batch(model, prompts, [0, 1, 2], sampling, [], tok.pad_token_id, None)
    alone = generate_batch(model, prompts[2:], [2], sampling, [], tok.pad_token_id, None)
    assert batched[2].ids == alone[2].ids  # a prompt's draws do not depend on its batch
    for label, ids in enumerate(prompts):
        assert batched[label].ids == _sampled_reference(model, ids, 12, 1.5, prompt_seed(7, label))
    other = generate_batch(model, prompts, [0, 1, 2], Generation(12, temperature=1.5, seed=8), [],
                           tok.pad_token_id, None)
    assert [other[k].ids for k in range(3)] != [batched[k].ids for k in range(3)]


def _capture(make_model, tmp_path, name: str, **extra) -> xr.Dataset:
    settings = CaptureSettings(base=str(make_model("llama", seed=0)), sft=str(make_model("llama", seed=1)),
                               prompts=RAGGED, store=str(tmp_path / name), device="cpu", store_dtype="float32",
                               top_k=2, generate=9, **extra)
    return xr.open_zarr(run_capture(settings, **QUIET))


def test_store_marks_responses_generated_by_the_chosen_model(make_model, tmp_path):
    from transformers import AutoTokenizer

    ds = _capture(make_model, tmp_path, "s.zarr", generate_with="base", batch_size=2)
    assert ds.attrs["generation"] == {"new_tokens": 9, "model": "base", "decoding": "greedy", "temperature": None,
                                      "seed": None}
    from store.reader import describe_store

    assert "responses  up to 9 tokens by the base model (greedy)" in describe_store(ds.encoding["source"])
    base = load(make_model("llama", seed=0))
    tok = AutoTokenizer.from_pretrained(make_model("llama", seed=0))
    stops = stop_ids(base, tok)
    for label in range(len(RAGGED)):
        row = ds.sel(prompt=label)
        start, n = int(row.response_start), int(row.n_tokens)
        ids = row.token_id.values[:n].tolist()
        prompt = tok(RAGGED[label], add_special_tokens=False)["input_ids"]
        room = min(9, 128 - len(prompt))  # RAGGED[1] fills the context: its response is empty
        assert ids[:start] == prompt and ids[start:] == (_alone(base, prompt, room, stops) if room else [])
        assert list(row.role.values[:n]) == ["text"] * start + ["response"] * (n - start)
        assert str(row.stop_reason.values) == ("context" if room < 9 else "eos" if ids[-1] in stops else "length")
        assert str(row.response_text.values) == tok.decode(ids[start:])
        # the passes ran over prompt + response exactly as over given text: BB's states are the base's own
        hidden = base(torch.tensor([ids]), output_hidden_states=True).hidden_states  # the last one after the norm
        np.testing.assert_allclose(ds.resid.sel(pass_="BB", prompt=label).values[:-1, :n],
                                   torch.stack(hidden[:-1])[:, 0].detach().numpy(), atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(ds.final.sel(pass_="BB", prompt=label).values[:n], hidden[-1][0].detach().numpy(),
                                   atol=2e-5, rtol=1e-4)


def test_chat_prompts_get_the_generation_prompt(tiny_pair, tmp_path):
    base, sft, _ = tiny_pair
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hello there"}]}\n'
                    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}\n')
    path = run_capture(CaptureSettings(base=base, sft=sft, prompts_files=[str(chat)], store=str(tmp_path / "c.zarr"),
                                       device="cpu", generate=6, lens=False), **QUIET)
    ds = xr.open_zarr(path)
    for label in range(2):
        row = ds.sel(prompt=label)
        start = int(row.response_start)
        assert "".join(row.token_str.values[:start]).endswith("<|assistant|>")  # the template's generation prompt
        assert row.role.values[start] == "response" and row.role.values[start - 1] == "template"


def test_resume_after_a_kill_mid_generation_gives_the_same_store(make_model, tmp_path, monkeypatch):
    sampling = {"temperature": 1.3, "seed": 3, "batch_size": 2}
    whole = _capture(make_model, tmp_path, "whole.zarr", **sampling)
    calls, real = [], gen_mod.generate_batch

    def dies_after_two(*args, **kwargs):
        calls.append(args[2])
        if len(calls) > 2:
            raise KeyboardInterrupt  # killed during the third batch
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate_batch", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _capture(make_model, tmp_path, "resumed.zarr", **sampling)
    assert not (tmp_path / "resumed.zarr").exists() and (tmp_path / "resumed.zarr.responses").is_dir()
    first = [label for batch in calls[:2] for label in batch]
    calls.clear()
    monkeypatch.setattr(gen_mod, "generate_batch", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    resumed = _capture(make_model, tmp_path, "resumed.zarr", **{**sampling, "batch_size": 3})
    assert not set(first) & {label for batch in calls for label in batch}  # none generated twice
    assert not (tmp_path / "resumed.zarr.responses").exists()
    for name in ("token_id", "response_start", "stop_reason", "role"):
        assert (resumed[name].values == whole[name].values).all(), name
    np.testing.assert_array_equal(resumed.resid.values, whole.resid.values)


def test_resume_of_a_created_store_reuses_its_responses(make_model, tmp_path, monkeypatch):
    import capture.pipeline.job as job

    whole = _capture(make_model, tmp_path, "whole.zarr")
    real = job._fill_store
    monkeypatch.setattr(job, "_fill_store", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _capture(make_model, tmp_path, "resumed.zarr")
    monkeypatch.setattr(job, "_fill_store", real)
    monkeypatch.setattr(gen_mod, "generate_batch", lambda *a, **k: pytest.fail("generated again"))
    resumed = _capture(make_model, tmp_path, "resumed.zarr")
    np.testing.assert_array_equal(resumed.token_id.values, whole.token_id.values)
    np.testing.assert_array_equal(resumed.resid.values, whole.resid.values)


@pytest.mark.parametrize(("extra", "message"), [
    ({"generate": 0}, "--generate 0"),
    ({"generate": -3}, "at least 1"),
    ({"generate": 4, "positions": "last:2"}, "--positions"),
    ({"generate": 4, "temperature": 0.0}, "--temperature must be a positive"),
    ({"generate_with": "base"}, "--generate-with only applies with --generate"),
    ({"temperature": 0.7}, "--temperature only applies with --generate"),
    ({"generate": 4, "store": "memory://bucket/s.zarr"}, "local --store"),
])
def test_bad_generation_flags_are_refused_before_any_model_loads(extra, message, tmp_path):
    settings = CaptureSettings(base=str(tmp_path / "missing-base"), sft=str(tmp_path / "missing-sft"),
                               **{"store": str(tmp_path / "s.zarr"), **extra})
    with pytest.raises(UsageError, match=message):
        run_capture(settings, **QUIET)


def test_sampling_without_a_seed_says_what_it_chose(make_model, tmp_path):
    said = []
    settings = CaptureSettings(base=str(make_model("llama", seed=0)), sft=str(make_model("llama", seed=1)),
                               prompts=RAGGED[:2], store=str(tmp_path / "s.zarr"), device="cpu", generate=3,
                               temperature=0.8, lens=False)
    ds = xr.open_zarr(run_capture(settings, log=said.append, progress=False))
    assert any("seed 0" in line for line in said)
    assert ds.attrs["generation"]["seed"] == 0 and ds.attrs["generation"]["decoding"] == "sample"


def test_plan_counts_the_response_tokens(make_model):
    from capture.plan.prepare import prepare

    settings = CaptureSettings(base=str(make_model("llama", seed=0)), sft=str(make_model("llama", seed=1)),
                               prompts=RAGGED, device="cpu", generate=20)
    without = prepare(CaptureSettings(**{**settings.to_dict(), "generate": None}), log=lambda *a: None)
    prep = prepare(settings, log=lambda *a: None)
    assert not prep.responded
    assert sorted(prep.tokenized.lengths) == sorted(min(n + 20, 128) for n in without.tokenized.lengths)
    from capture.plan.memory import build_plan

    room = sum(prep.tokenized.lengths) - sum(without.tokenized.lengths)
    assert f"{room} response tokens" in build_plan(prep).describe()
