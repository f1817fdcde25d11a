"""Ragged prompt sets: the store lays prompts out longest first in token chunks, and keeps the user's view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from capture.models.loading import decoder_layers, load_input_embedding
from capture.pipeline.job import run_capture
from capture.pipeline.runner import forward_residuals
from capture.settings import CaptureSettings
from store.chunking import real_blocks
from store.integrity import stored_chunks
from store.reader import open_store
from tests.helpers import ARCHS, RAGGED, load


def _capture(base, sft, store, **extra):
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=RAGGED, store=str(store), store_dtype="float32",
                               device="cpu", lens=False, **extra)
    return open_store(run_capture(settings, log=lambda *a: None, progress=False))


def _old_layout(base, sft, tokenizer, name: str) -> np.ndarray:
    """What a format-1 store held for one pass: each prompt run alone, in source order, padded with NaN."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    llm_dir, emb_dir = {"BB": (base, base), "BS": (sft, base), "SB": (base, sft), "SS": (sft, sft)}[name]
    llm, embedding = load(llm_dir), load_input_embedding(str(emb_dir))
    ids = [tok(text, add_special_tokens=False)["input_ids"] for text in RAGGED]
    out = np.full((len(ids), len(decoder_layers(llm)) + 1, max(map(len, ids)), llm.config.hidden_size), np.nan,
                  np.float32)
    for row, seq in enumerate(ids):
        resid, _ = forward_residuals(llm, embedding, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
        out[row, :, : len(seq)] = resid[0].numpy()
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_view_equals_the_old_layout_exactly(arch, make_model, tokenizer_dir, tmp_path):
    base, sft = make_model(arch, seed=0), make_model(arch, seed=1)
    ds = _capture(base, sft, tmp_path / "s.zarr", batch_size=1, chunk_prompts=2)
    lengths = ds.n_tokens.values
    assert (np.diff(lengths) <= 0).all()  # longest first in the store
    view = xr.open_zarr(tmp_path / "s.zarr").sel(pass_="SS")  # the user's plain view
    assert view.resid.dims == ("prompt", "layer", "token", "dim")
    for name in ("BB", "SB", "SS"):
        old = _old_layout(base, sft, tokenizer_dir, name)
        for plain in (False, True):
            source = xr.open_zarr(tmp_path / "s.zarr") if plain else ds
            got = source.resid.sel(pass_=name).sel(prompt=np.arange(len(RAGGED))).values
            assert np.array_equal(got, old, equal_nan=True), f"{arch} {name} plain={plain}"


def test_length_buckets_equal_prompts_run_alone(make_model, tokenizer_dir, tmp_path):
    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    ds = _capture(base, sft, tmp_path / "s.zarr", batch_size=64, batch_tokens=64)
    old = _old_layout(base, sft, tokenizer_dir, "BS")
    got = ds.resid.sel(pass_="BS").sel(prompt=np.arange(len(RAGGED))).values
    np.testing.assert_allclose(got, old, atol=1e-5, rtol=0, equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(old))


def test_padding_chunks_are_never_written_nor_read(make_model, tmp_path):
    base, sft = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    path = tmp_path / "s.zarr"
    ds = _capture(base, sft, path, chunk_prompts=1)
    chunk_prompt, chunk_token = ds.resid.data.chunksize[1], ds.resid.data.chunksize[3]
    real = real_blocks(ds.n_tokens.values, chunk_prompt, chunk_token, ds.sizes["token"])
    assert not real.all()  # the set is ragged enough to have padding-only chunks
    # the inner chunks the shards' indexes list (format 4), or the chunk files of an unsharded store
    written = stored_chunks(path, "resid", zarr.open_group(str(path), mode="r")["resid"])
    assert zarr.open_group(str(path), mode="r")["resid"].shards is not None
    assert {(k[1], k[3]) for k in written} == {tuple(int(i) for i in b) for b in np.argwhere(real)}
    # Reading through open_store touches only the real chunks, each read straight from its file (checksum
    # verified): count the read tasks after graph culling; zarr's own getters are culled away.
    from dask.optimization import cull

    graph = dict(ds.resid.data.__dask_graph__())
    getters = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("open_dataset-resid")]
    culled, _ = cull(graph, [k for k in graph if isinstance(k, tuple) and k[0] == ds.resid.data.name])
    loaded = [k for k in culled if isinstance(k, tuple) and str(k[0]).startswith("open_dataset-resid")]
    reads = [k for k, task in culled.items() if "_read_block" in repr(task)]
    assert len(reads) == int(real.sum()) * ds.sizes["pass_"] * len(ds.resid.data.chunks[2]) < len(getters)
    assert not loaded
    from store.verify import verify_store

    assert verify_store(path) == []


def test_real_positions_are_the_real_rows_lazily(make_model, tmp_path):
    import dask

    from analysis import real_positions
    from store.testing import CountingScheduler

    base, sft = make_model("gpt2", seed=0), make_model("gpt2", seed=1)
    ds = _capture(base, sft, tmp_path / "s.zarr", chunk_prompts=2)
    with dask.config.set(scheduler=CountingScheduler(0)):
        rows = real_positions(ds)
    assert rows.dims == ("pass_", "layer", "position", "dim") and rows.sizes["position"] == int(ds.n_tokens.sum())
    values = rows.sel(pass_="SB").values
    for i in range(rows.sizes["position"]):
        prompt, token = int(rows.prompt[i]), int(rows.token[i])
        want = ds.resid.sel(pass_="SB", prompt=prompt).isel(token=token).values
        assert np.array_equal(values[:, i], want)
    assert np.isfinite(values).all()


def test_metrics_of_a_ragged_store_match_a_float64_reference(make_model, tmp_path):
    from analysis import pair_metrics, pass_metrics
    from analysis.compute.positions import has_padding_chunks

    base, sft = make_model("qwen2", seed=0), make_model("qwen2", seed=1)
    ds = _capture(base, sft, tmp_path / "s.zarr", chunk_prompts=1)
    assert has_padding_chunks(ds)  # the row path, not the padded blocks
    h = {p: ds.resid.sel(pass_=p).values.astype(np.float64) for p in ("BB", "BS", "SS")}
    got = pair_metrics(ds).sel(pair="BS-SS").compute()
    diff = np.sqrt(((h["SS"] - h["BS"]) ** 2).sum(-1))
    cos = (h["SS"] * h["BS"]).sum(-1) / np.sqrt((h["SS"] ** 2).sum(-1) * (h["BS"] ** 2).sum(-1))
    np.testing.assert_allclose(got.norm_diff.values, diff, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got.cosine_sim.values, cos, rtol=1e-6, equal_nan=True)
    assert np.array_equal(np.isnan(got.norm_diff.values), np.isnan(diff))
    norm = pass_metrics(ds).norm.sel(pass_="BB").values
    np.testing.assert_allclose(norm, np.sqrt((h["BB"] ** 2).sum(-1)), rtol=1e-6, equal_nan=True)
