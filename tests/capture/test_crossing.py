"""Crossed passes (``capture --cross-layers``): against a plain composition of the two models' own forwards
(a hook hands the lower model's hidden state to the upper model's block), and against ground truth: a pair
that differs only from block k on, and a pair that differs only in its input embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.errors import UsageError
from tests.helpers import ARCHS, RAGGED, load

QUIET = {"log": lambda *a: None, "progress": False}
N_LAYERS = 3  # the test models' blocks (tests.helpers.model_config)


def _capture(base, sft, path, **extra) -> xr.Dataset:
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=RAGGED, store=str(path), device="cpu",
                               store_dtype="float32", top_k=2, **extra)
    return xr.open_zarr(run_capture(settings, **QUIET))


def _derived(source, path, change) -> str:
    """A copy of the model at ``source`` with ``change(model)`` applied, saved with its tokenizer."""
    from transformers import AutoTokenizer

    model = load(source)
    torch.manual_seed(7)
    with torch.no_grad():
        change(model)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return str(path)


def _reference(lower, upper, ids: list[int], split: int) -> tuple[np.ndarray, np.ndarray]:
    """(layers 0..L-1, final) of ``lower``'s blocks below ``split`` then ``upper``'s, composed by hand: the
    lower model's own hidden state at the split replaces the input of the upper model's block."""
    from capture.models.loading import decoder_layers

    x = torch.tensor([ids])
    with torch.no_grad():
        below = lower(x, output_hidden_states=True).hidden_states[split]

        def swap(module, args, kwargs):
            return ((below, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": below})

        handle = decoder_layers(upper)[split].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            low = lower(x, output_hidden_states=True).hidden_states
            high = upper(x, output_hidden_states=True).hidden_states
        finally:
            handle.remove()
    layers = [low[la] if la <= split else high[la] for la in range(N_LAYERS)]  # the last is post-norm in HF
    return torch.stack(layers)[:, 0].numpy(), high[-1][0].numpy()


@pytest.mark.parametrize("arch", ARCHS)
def test_crossed_passes_equal_a_plain_composition(arch, make_model, tmp_path):
    base, sft = make_model(arch, seed=0), make_model(arch, seed=1)
    ds = _capture(base, sft, tmp_path / "s.zarr", cross_layers="1,2", lens=False)
    models = {"base": load(base), "sft": load(sft)}
    for split in (1, 2):
        for name, lower, upper in ((f"B>S@{split}", "base", "sft"), (f"S>B@{split}", "sft", "base")):
            for label in range(len(RAGGED)):
                row = ds.sel(pass_=name, prompt=label)
                n = int(row.n_tokens)
                layers, final = _reference(models[lower], models[upper], row.token_id.values[:n].tolist(), split)
                np.testing.assert_allclose(row.resid.values[:N_LAYERS, :n], layers, atol=3e-5, rtol=1e-4,
                                           err_msg=f"{arch} {name} prompt {label}")
                np.testing.assert_allclose(row.final.values[:n], final, atol=3e-5, rtol=1e-4)
    assert list(ds.split_layer.values) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert list(ds.lower_body.values[4:6]) == ["base", "sft"] and list(ds.upper_body.values[4:6]) == ["sft", "base"]


def test_a_pair_that_differs_from_block_k_on(make_model, tmp_path):
    """SFT = base with blocks k.. changed: B>S@L is SS and S>B@L is BB for every L <= k, not above."""
    from capture.models.loading import decoder_layers

    k = 2
    base = make_model("llama", seed=0)

    def late_blocks(model):
        for block in list(decoder_layers(model))[k:]:
            for weight in block.parameters():
                weight.add_(0.05 * torch.randn_like(weight))

    sft = _derived(base, tmp_path / "late", late_blocks)
    ds = _capture(base, sft, tmp_path / "s.zarr", cross_layers=f"0:{N_LAYERS + 1}")
    resid = ds.resid.values
    index = {str(p): i for i, p in enumerate(ds.pass_.values)}
    for split in range(N_LAYERS + 1):
        crossed_bs, crossed_sb = resid[index[f"B>S@{split}"]], resid[index[f"S>B@{split}"]]
        if split <= k:
            np.testing.assert_array_equal(crossed_bs, resid[index["SS"]])
            np.testing.assert_array_equal(crossed_sb, resid[index["BB"]])
        else:
            assert not np.array_equal(crossed_bs, resid[index["SS"]], equal_nan=True)
        np.testing.assert_array_equal(crossed_bs[:, : split + 1], resid[index["BB"]][:, : split + 1])  # below L
    kl = ds.kl.sel(lens="norm", pair=[f"B>S@{s}-SS" for s in range(k + 1)]).values
    assert np.nanmax(np.abs(kl)) < 1e-6  # the statistics see no change where there is none


def test_a_pair_that_differs_only_in_its_input_embedding(make_model, tmp_path):
    base = make_model("llama", seed=0)
    sft = _derived(base, tmp_path / "emb", lambda m: m.get_input_embeddings().weight.add_(
        0.1 * torch.randn_like(m.get_input_embeddings().weight)))
    ds = _capture(base, sft, tmp_path / "s.zarr", cross_layers="0:4", lens=False)
    resid = ds.resid.values
    index = {str(p): i for i, p in enumerate(ds.pass_.values)}
    for split in range(N_LAYERS + 1):
        np.testing.assert_array_equal(resid[index[f"B>S@{split}"]], resid[index["BB"]])
        np.testing.assert_array_equal(resid[index[f"S>B@{split}"]], resid[index["SS"]])
    # the analysis takes crossed passes as passes: its default pairs, and their metrics
    from analysis import open_store, pair_metrics
    from analysis.geometry.metrics import store_pass_pairs

    opened = open_store(tmp_path / "s.zarr")
    names = store_pass_pairs(opened)[0]
    assert len(names) == 6 + 4 * (N_LAYERS + 1) and "B>S@2-SS" in names and "S>B@2-BB" in names
    assert "BB-B>S@2" in names and "BB-S>B@2" in names  # the KL interaction's terms
    diff = pair_metrics(opened, names=["norm_diff"]).norm_diff
    np.testing.assert_array_equal(diff.sel(pair="B>S@2-SS").values, diff.sel(pair="BB-SS").values)


def test_resume_after_a_kill_between_the_models(make_model, tmp_path, monkeypatch):
    import capture.pipeline.job as job

    base, sft = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    whole = _capture(base, sft, tmp_path / "whole.zarr", cross_layers="1,2", batch_size=2)
    real, loads = job.load_model, []

    def dies_at_the_second_model(*args, **kwargs):
        loads.append(args[0])
        if len(loads) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "load_model", dies_at_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        _capture(base, sft, tmp_path / "resumed.zarr", cross_layers="1,2", batch_size=2)
    assert (tmp_path / "resumed.zarr.carry").is_dir()
    monkeypatch.setattr(job, "load_model", real)
    resumed = _capture(base, sft, tmp_path / "resumed.zarr", cross_layers="1,2", batch_size=2)
    assert not (tmp_path / "resumed.zarr.carry").exists()
    np.testing.assert_array_equal(resumed.resid.values, whole.resid.values)
    np.testing.assert_array_equal(resumed.kl.values, whole.kl.values)


def _killed_before_the_second_model(make_model, tmp_path, monkeypatch):
    """(base, sft, an undisturbed store) after a capture of ``resumed.zarr`` was killed as the SFT model loaded
    (the base model's passes and their carried states written, the crossed passes not)."""
    import capture.pipeline.job as job

    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    whole = _capture(base, sft, tmp_path / "whole.zarr", cross_layers="2", lens=False)
    with monkeypatch.context() as patched:
        real = job.load_model
        patched.setattr(job, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
                        if a[0] == str(sft) else real(*a, **k))
        with pytest.raises(KeyboardInterrupt):
            _capture(base, sft, tmp_path / "resumed.zarr", cross_layers="2", lens=False)
    return base, sft, whole


def test_carried_states_lost_after_a_kill_are_computed_again(make_model, tmp_path, monkeypatch):
    import shutil

    base, sft, whole = _killed_before_the_second_model(make_model, tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "resumed.zarr.carry")
    resumed = _capture(base, sft, tmp_path / "resumed.zarr", cross_layers="2", lens=False)
    np.testing.assert_array_equal(resumed.resid.values, whole.resid.values)


def test_a_damaged_carried_state_is_refused_and_computed_again(make_model, tmp_path, monkeypatch):
    """One flipped byte in a carried state, after a kill between the models: the resumed run stops before any
    crossed value is written from it (one error that says to rerun), and the rerun recomputes it: the store
    equals an undisturbed capture."""
    from capture.errors import CarriedStateDamaged

    base, sft, whole = _killed_before_the_second_model(make_model, tmp_path, monkeypatch)
    (state,) = (tmp_path / "resumed.zarr.carry").glob("*.bin")
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit of one value of a prompt in the middle
    state.write_bytes(bytes(data))
    with pytest.raises(CarriedStateDamaged, match=r"fails its checksum.*rerun the same command"):
        _capture(base, sft, tmp_path / "resumed.zarr", cross_layers="2", lens=False)
    resumed = _capture(base, sft, tmp_path / "resumed.zarr", cross_layers="2", lens=False)
    np.testing.assert_array_equal(resumed.resid.values, whole.resid.values)


@pytest.mark.parametrize(("spec", "message"), [
    ("9", "split 9 is out of range"), ("2,1", "increasing order"), ("1,1", "increasing order"),
    ("x", "give split layers as"), ("-1", "out of range"), ("1:1", "names no split layer"),
])
def test_bad_cross_layers_are_refused_before_any_model_loads(spec, message, make_model, tmp_path, monkeypatch):
    import capture.pipeline.job as job

    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(UsageError, match=message):
        _capture(make_model("llama", seed=0), make_model("llama", seed=1), tmp_path / "s.zarr", cross_layers=spec)


def test_crossed_passes_need_their_source_pass(make_model, tmp_path):
    with pytest.raises(UsageError, match="keep SS in --passes"):
        _capture(make_model("llama", seed=0), make_model("llama", seed=1), tmp_path / "s.zarr", cross_layers="1",
                 passes="BB,BS,SB")


def test_the_plan_prices_the_third_step_and_the_carried_states(make_model, capsys):
    from cli import main

    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    assert main(["capture", "--base", str(base), "--sft", str(sft), "--cross-layers", "1,2", "--plan",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "3. base model, passes S>B@1, S>B@2" in out and "carried states" in out
    assert "2. sft model, passes BS, SS, B>S@1, B>S@2" in out
