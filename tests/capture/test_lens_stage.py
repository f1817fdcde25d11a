"""Lens statistics written by a capture, against a float64 reference computed per position
straight from the models (their own hidden states, lm_head and final norm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.models.loading import final_norm
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.reader import open_store
from tests.helpers import PROMPTS, load


def _hidden_states(llm, donor, ids):
    """Raw residuals 0..L of ``llm`` on ``donor``'s embeddings, by a hook on each block (float32)."""
    from capture.models.loading import decoder_layers

    outs = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
               for b in decoder_layers(llm)]
    with torch.no_grad():
        hidden = llm(inputs_embeds=donor.get_input_embeddings()(ids), output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    return [hidden[0][0], *[o[0] for o in outs]]


def _reference(h, model, lens):
    """float64 log-probs and logits of one position, per the lens definitions."""
    if lens == "norm":
        with torch.no_grad():
            h = final_norm(model)(h[None])[0]
    w = model.get_output_embeddings().weight.detach().double().numpy()
    z = w @ h.double().numpy()
    m = z.max()
    logp = z - (m + np.log(np.exp(z - m).sum()))
    return z, logp


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma"])
def test_stored_statistics_match_float64_reference(arch, make_model, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    base_dir, sft_dir = make_model(arch, seed=0), make_model(arch, seed=1)
    tracked = ["Ġthe", "7"]
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:3], store=str(tmp_path / "s"),
                               store_dtype="float32", device="cpu", batch_size=2, top_k=4, track=tracked)
    # Sorted by label: prompt i is PROMPTS[i] (the store lays prompts out longest first).
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False)).sortby("prompt").load()
    assert bool(ds.lens_done.all())
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    models = {"base": load(base_dir), "sft": load(sft_dir)}
    assert ds.tracked_id.values.tolist() == sorted([7, tok.convert_tokens_to_ids("Ġthe")])
    for prompt, text in enumerate(PROMPTS[:3]):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        states = {}
        for p, llm, emb in zip(ds.pass_.values, ds.model.values, ds.embedding.values, strict=True):
            states[p] = (_hidden_states(models[llm], models[emb], ids), models[llm])
        pass_i = {p: i for i, p in enumerate(ds.pass_.values)}
        v = {name: ds[name].values for name in ds.data_vars}
        for lens_i, lens in enumerate(("raw", "norm")):
            for layer in range(ds.sizes["layer"]):
                for token in range(ids.shape[1]):
                    ref = {p: _reference(h[layer][token], m, lens) for p, (h, m) in states.items()}
                    at = (lens_i, prompt, layer, token)
                    for p, (z, logp) in ref.items():
                        i = pass_i[p]
                        entropy = -(np.exp(logp) * logp).sum()
                        np.testing.assert_allclose(v["entropy"][(i, *at)], entropy, rtol=1e-5)
                        top = np.argsort(-z)[:4]
                        assert v["topk_id"][(i, *at)].tolist() == top.tolist()
                        np.testing.assert_allclose(v["topk_logit"][(i, *at)], z[top], rtol=1e-5, atol=1e-6)
                        np.testing.assert_allclose(v["tracked_logit"][(i, *at)], z[ds.tracked_id.values],
                                                   rtol=1e-5, atol=1e-6)
                        if token + 1 < ids.shape[1]:  # teacher forcing: the log-prob of the token that follows
                            np.testing.assert_allclose(v["target_logprob"][(i, *at)], logp[ids[0, token + 1]],
                                                       rtol=1e-5, atol=1e-5)
                        else:
                            assert np.isnan(v["target_logprob"][(i, *at)])
                    for q, (left, right) in enumerate(zip(ds.left.values, ds.right.values, strict=True)):
                        (z_l, lp_l), (z_r, lp_r) = ref[left], ref[right]
                        kl = (np.exp(lp_r) * (lp_r - lp_l)).sum()
                        # float32 states carry ~1e-8 of absolute noise into any KL, however small
                        np.testing.assert_allclose(v["kl"][(q, *at)], kl, rtol=1e-5, atol=5e-8)
                        shift = z_r - z_l
                        rise, fall = np.argsort(-shift)[:4], np.argsort(shift)[:4]
                        assert v["rise_id"][(q, *at)].tolist() == rise.tolist()
                        assert v["fall_id"][(q, *at)].tolist() == fall.tolist()
                        np.testing.assert_allclose(v["rise_shift"][(q, *at)], shift[rise], rtol=1e-5, atol=1e-6)
                        np.testing.assert_allclose(v["fall_shift"][(q, *at)], shift[fall], rtol=1e-5, atol=1e-6)
        for lens in ("raw", "norm"):  # padding positions carry no statistics
            n_tok = ids.shape[1]
            assert np.isnan(ds.entropy.sel(lens=lens, prompt=prompt).values[..., n_tok:]).all()
            assert (ds.topk_id.sel(lens=lens, prompt=prompt).values[..., n_tok:, :] == -1).all()


def test_batched_statistics_equal_one_prompt_at_a_time(make_model, tmp_path):
    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)

    def capture(prompts, name, batch):
        settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=prompts, store=str(tmp_path / name),
                                   store_dtype="float32", device="cpu", batch_size=batch, top_k=3)
        return open_store(run_capture(settings, log=lambda *a: None, progress=False)).sortby("prompt")

    together = capture(PROMPTS, "all", 4)
    for i, text in enumerate(PROMPTS):
        alone = capture([text], f"one{i}", 1)
        n = int(alone.n_tokens[0])
        for name in ("entropy", "lse", "kl", "topk_logit", "rise_shift"):
            np.testing.assert_allclose(together[name].isel(prompt=i, token=slice(0, n)).values,
                                       alone[name].isel(prompt=0).values, rtol=1e-5, atol=1e-6, err_msg=name)
        for name in ("topk_id", "rise_id", "fall_id"):
            np.testing.assert_array_equal(together[name].isel(prompt=i, token=slice(0, n)).values,
                                          alone[name].isel(prompt=0).values, err_msg=name)


def test_a_write_group_read_in_parts_gives_the_same_statistics(make_model, tmp_path, monkeypatch):
    """A write group too big to read as float32 at once (a shard row of long prompts) is read a few prompts at a
    time and its statistics assembled: they equal those of the group read whole."""
    import capture.lens.stage

    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)

    def run(name):
        settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS, store=str(tmp_path / name),
                                   store_dtype="float32", device="cpu", batch_size=4, top_k=3)
        return open_store(run_capture(settings, log=lambda *a: None, progress=False))

    reads = []
    real = capture.lens.stage.lens_read_prompts
    monkeypatch.setattr(capture.lens.stage, "lens_read_prompts", lambda *a: reads.append(real(*a)) or reads[-1])
    whole = run("whole")
    assert reads and all(r > 1 for r in reads)  # groups of several prompts, each read at once
    monkeypatch.setattr(capture.lens.stage, "lens_read_prompts", lambda *a: 1)  # one prompt per read
    parts = run("parts")
    for name in ("entropy", "lse", "kl", "topk_logit", "rise_shift"):
        np.testing.assert_allclose(parts[name].values, whole[name].values, rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("topk_id", "rise_id", "fall_id"):
        np.testing.assert_array_equal(parts[name].values, whole[name].values, err_msg=name)
    assert bool(parts.lens_done.all())


def test_every_statistic_of_the_table_is_computed_and_stored(make_model, tmp_path):
    """``store.schema.STATISTICS`` is the one list: the template declares each, the kernels compute each (real
    values at every real position) and the memory plan prices each (its bytes per position are the stored
    arrays' itemsizes)."""
    from store.schema import STATISTICS, statistics_bytes_per_position

    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:2], store=str(tmp_path / "s"),
                               device="cpu", top_k=3, track=["5", "7"])
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False))
    stored = {name for name in ds.data_vars if "lens" in ds[name].dims}
    assert stored == {s.name for s in STATISTICS}
    real = (ds.token < ds.n_tokens).transpose("prompt", "token").values
    followed = (ds.token < ds.n_tokens - 1).transpose("prompt", "token").values  # a next token is stored
    per_position = 0
    for stat in STATISTICS:
        values = ds[stat.name].transpose(stat.lead, "lens", "prompt", "layer", "token", ...).values
        at_real = np.moveaxis(values, (2, 4), (0, 1))[followed if stat.name == "target_logprob" else real]
        filled = np.isnan(at_real) if values.dtype.kind == "f" else at_real < 0
        assert not filled.any(), f"{stat.name} has unwritten real positions"
        if stat.name == "target_logprob":  # a prompt's last position has no next token: NaN, not a number
            assert np.isnan(np.moveaxis(values, (2, 4), (0, 1))[real & ~followed]).all()
        per_position += int(np.prod([ds.sizes[d] for d in ds[stat.name].dims
                                     if d not in ("prompt", "layer", "token")])) * values.dtype.itemsize
    assert per_position == statistics_bytes_per_position(ds.sizes["pass_"], ds.sizes["pair"], 3, 2)


def test_the_stage_computes_each_statistic_from_its_kernel_field():
    """The stage's fields come from ``STATISTICS`` and name every field of the kernels' ``LensStats`` once."""
    import dataclasses

    from capture.lens.logit_lens import LensStats
    from capture.lens.stage import _FIELDS

    assert sorted(f[1] for f in _FIELDS) == sorted(f.name for f in dataclasses.fields(LensStats))


def test_pairs_option_and_kl_of_same_pass(make_model, tmp_path):
    base_dir, sft_dir = make_model("llama", seed=0), make_model("llama", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:2], store=str(tmp_path / "s"),
                               device="cpu", pass_pairs="BB-SS,same=SS-SS", top_k=2)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False))
    assert ds.pair.values.tolist() == ["BB-SS", "same"]
    assert ds.left.values.tolist() == ["BB", "SS"] and ds.right.values.tolist() == ["SS", "SS"]
    kl_same = ds.kl.sel(pair="same").values
    assert np.nanmax(np.abs(kl_same)) == 0.0
    assert np.nanmin(ds.kl.sel(pair="BB-SS").values) >= 0


def test_bfloat16_model_statistics_accumulate_in_float32(make_model, tmp_path):
    """With a bf16 model, statistics of the stored states still agree with a float64 reference to
    float32 precision: the products and sums are not done in the model dtype (as the legacy tool did)."""
    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:2], device="cpu",
                               store=str(tmp_path / "s"), store_dtype="float32", dtype="bfloat16", top_k=3)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False)).load()
    assert ds.attrs["model_dtype"] == "bfloat16"
    weights = {name: load(path, torch.bfloat16).get_output_embeddings().weight.detach().double().numpy()
               for name, path in (("base", base_dir), ("sft", sft_dir))}
    for prompt in range(2):
        for layer in range(ds.sizes["layer"]):
            for token in range(int(ds.n_tokens[prompt])):
                logp = {}
                for p in ("BB", "SS"):
                    h = ds.resid.sel(pass_=p).values[prompt, layer, token].astype(np.float64)
                    z = weights[str(ds.unembedding.sel(pass_=p).values)] @ h
                    logp[p] = z - (z.max() + np.log(np.exp(z - z.max()).sum()))
                    entropy = -(np.exp(logp[p]) * logp[p]).sum()
                    stored = ds.entropy.sel(pass_=p, lens="raw").values[prompt, layer, token]
                    np.testing.assert_allclose(stored, entropy, rtol=1e-5)
                kl = (np.exp(logp["SS"]) * (logp["SS"] - logp["BB"])).sum()
                stored = ds.kl.sel(pair="BB-SS", lens="raw").values[prompt, layer, token]
                np.testing.assert_allclose(stored, kl, rtol=1e-5, atol=5e-8)


def test_pass_reads_out_with_its_own_unembedding(make_model, tmp_path):
    """A base-LLM pass with the SFT unembedding (the SFT model never runs as LLM) uses the SFT head."""
    base_dir, sft_dir = make_model("llama", seed=0), make_model("llama", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:1], device="cpu",
                               store=str(tmp_path / "s"), store_dtype="float32", passes="BB,X=base:base:sft")
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False)).load()
    np.testing.assert_array_equal(ds.resid.sel(pass_="X").values, ds.resid.sel(pass_="BB").values)
    for name, path in (("BB", base_dir), ("X", sft_dir)):
        w = load(path).get_output_embeddings().weight.detach().double().numpy()
        z = w @ ds.resid.sel(pass_=name).values[0, 2, 3].astype(np.float64)
        lse = z.max() + np.log(np.exp(z - z.max()).sum())
        np.testing.assert_allclose(ds.lse.sel(pass_=name, lens="raw").values[0, 2, 3], lse, rtol=1e-6)


def test_lens_layers_compute_the_chosen_layers_only(make_model, tmp_path, capsys):
    """--lens-layers: the chosen layers' statistics equal a full capture's, the others are never computed (fill
    values, not numbers), every reader follows the lens_layer coordinate, and bad specs are refused up front."""
    from analysis.report.text import build_report
    from cli import main
    from store.schema import lens_layers

    base_dir, sft_dir = make_model("llama", seed=0), make_model("llama", seed=1)

    def capture(name, **extra):
        settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:3],
                                   store=str(tmp_path / name), store_dtype="float32", device="cpu", top_k=3, **extra)
        return open_store(run_capture(settings, log=lambda *a: None, progress=False))

    full, some = capture("full"), capture("some", lens_layers="1,-1")
    last = int(full.layer.values[-1])
    assert lens_layers(some) == [1, last] and lens_layers(full) == [int(x) for x in full.layer.values]
    for name in ("entropy", "kl", "topk_logit"):
        np.testing.assert_allclose(some[name].sel(layer=[1, last]).values, full[name].sel(layer=[1, last]).values,
                                   rtol=1e-6, equal_nan=True, err_msg=name)
        assert np.isnan(some[name].sel(layer=[0, 2]).values).all()
    np.testing.assert_array_equal(some.topk_id.sel(layer=[1, last]).values, full.topk_id.sel(layer=[1, last]).values)
    text, _ = build_report(some, metrics=["kl"])
    assert "kl by layer" in text and not any(line.split()[:1] in (["0"], ["2"]) for line in
                                             text.split("kl by layer")[1].split("top")[0].splitlines()[2:])
    assert "nan" not in text.lower()
    capsys.readouterr()
    for spec, message in (("9", "outside"), ("1:1", "names no layer")):
        code = main(["capture", "--base", str(base_dir), "--sft", str(sft_dir), "--store", str(tmp_path / "bad"),
                     "--prompt", "hi", "--lens-layers", spec, "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_target_logprob_at_the_last_layer_is_the_models_own(make_model, tokenizer_dir, tmp_path):
    """Under the normed lens at the last layer, BB's and SS's target_logprob is each model's own next-token
    log-probability, from its forward with the LM head (float32)."""
    from transformers import AutoTokenizer

    base_dir, sft_dir = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    settings = CaptureSettings(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:3], store=str(tmp_path / "s"),
                               store_dtype="float32", device="cpu", top_k=2)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False)).sortby("prompt").load()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for prompt, text in enumerate(PROMPTS[:3]):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        for pass_, model_dir in (("BB", base_dir), ("SS", sft_dir)):
            with torch.no_grad():
                logp = torch.log_softmax(load(model_dir)(input_ids=ids).logits[0].double(), -1)
            own = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].numpy()
            stored = ds.target_logprob.sel(pass_=pass_, lens="norm", prompt=prompt).isel(layer=-1).values
            np.testing.assert_allclose(stored[: ids.shape[1] - 1], own, rtol=1e-5, atol=1e-5)
            assert np.isnan(stored[ids.shape[1] - 1:]).all()
