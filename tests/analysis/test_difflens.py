"""The difference lens on a pair whose difference is a known unembedding direction; the shift rate."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from analysis import open_store
from analysis.geometry.metrics import store_pass_pairs
from analysis.readouts.difflens import _checkpoint_lens, diff_lens, load_lenses, shift_rate, shift_rate_interval
from store.testing import save_identity_lens, write_tiny_store
from store.writer import consolidate

HIDDEN = 8


def _store_with_a_planted_difference(tmp_path, promoted: int, suppressed: int):
    path = write_tiny_store(tmp_path / "s.zarr", hidden=HIDDEN, n_prompts=3)
    save_identity_lens(path)  # token i's unembedding row is 3 e_i
    weight = np.eye(HIDDEN, dtype=np.float32) * 3
    group = zarr.open_group(str(path), mode="r+")
    direction = weight[promoted] - weight[suppressed]
    bb = group["resid"][0]
    group["resid"][3] = bb + 5 * direction  # SS = BB + a known direction (NaN padding stays NaN)
    consolidate(path)
    return open_store(path)


def test_a_planted_unembedding_direction_is_read_back(tmp_path):
    ds = _store_with_a_planted_difference(tmp_path, promoted=5, suppressed=2)
    result = diff_lens(ds, k=2, top=3, include_massive=True)
    assert result.attrs["lens_source"] == "the store's saved lens"
    cell = result.sel(pair="BB-SS")
    assert (cell.promoted_id.isel(rank=0).values == 5).all()
    assert (cell.suppressed_id.isel(rank=0).values == 2).all()
    assert (cell.promoted_logit.isel(rank=0).values > cell.promoted_logit.isel(rank=1).values).all()


@pytest.fixture(scope="module")
def tiny_store(tiny_pair, tmp_path_factory):
    from cli import main

    store = tmp_path_factory.mktemp("difflens") / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--save-lens", "--quiet",
                 "--prompt", "The moon is bright.", "--prompt", "Why is the sky blue at noon?"]) == 0
    return store


def test_checkpoint_lens_equals_the_saved_lens(tiny_store):
    ds = open_store(tiny_store)
    saved, source = load_lenses(ds)
    assert source == "the store's saved lens"
    h = np.random.default_rng(0).standard_normal((4, ds.sizes["dim"]))
    for name in ("base", "sft"):
        from_checkpoint = _checkpoint_lens(ds.attrs["models"][name]["ref"])
        np.testing.assert_allclose(from_checkpoint.logits(h), saved[name].logits(h), rtol=1e-5, atol=1e-5)


def test_shift_rate_against_a_plain_count(tiny_store):
    ds = open_store(tiny_store).sortby("prompt")
    got = shift_rate(ds).compute()
    top = ds.topk_id.sel(lens="norm").isel(layer=-1).values  # (pass, prompt, token, k)
    passes = list(ds.pass_.values)
    for q, (left, right) in enumerate(zip(ds.left.values, ds.right.values, strict=True)):
        shifted = real = 0
        for p in range(ds.sizes["prompt"]):
            for t in range(int(ds.n_tokens.values[p])):
                real += 1
                shifted += top[passes.index(right), p, t, 0] not in top[passes.index(left), p, t, :3]
        assert float(got.isel(pair=q)) == shifted / real


def _plain_mean_differences(ds, k, keep_pt, layers):
    """A float64 loop over positions: the reference of the streamed means."""
    resid = np.asarray(ds.resid.sel(layer=layers).values, dtype=np.float64)  # (pass, prompt, layer, token, dim)
    passes = [str(p) for p in ds.pass_.values]

    names, lefts, rights = store_pass_pairs(ds)
    result = np.zeros((len(names), len(layers), 2, resid.shape[-1]))
    for q, (left, right) in enumerate(zip(lefts, rights, strict=True)):
        for w, window in enumerate(("first", "all")):
            rows = []
            for p in range(ds.sizes["prompt"]):
                for t in range(int(ds.n_tokens.values[p])):
                    if keep_pt[p, t] and (window == "all" or t < k):
                        rows.append(resid[passes.index(right), p, :, t] - resid[passes.index(left), p, :, t])
            result[q, :, w] = np.mean(rows, axis=0)
    return result


@pytest.mark.parametrize("layers", [[0, 1, 2], [2]])
def test_streamed_mean_differences_equal_a_plain_loop(tmp_path, layers):
    from analysis.readouts.difflens import _mean_differences_xarray, mean_differences
    from store.chunking import Chunking

    lengths = (23, 17, 17, 9, 4, 2, 1)
    path = write_tiny_store(tmp_path / "r.zarr", n_prompts=len(lengths), lengths=lengths, store_dtype="float16",
                            chunking=Chunking(prompt=2, layer=3, token=4))
    ds = open_store(path)
    rng = np.random.default_rng(1)
    keep_pt = rng.random((ds.sizes["prompt"], ds.sizes["token"])) > 0.3
    where = xr.DataArray(keep_pt, dims=("prompt", "token"))
    streamed = mean_differences(ds, 3, where, layers)
    assert "masked-sums" in str(streamed.data.dask.layers.keys())  # the streamed path, not the xarray one
    expected = _plain_mean_differences(ds, 3, keep_pt, layers)
    np.testing.assert_allclose(streamed.values, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_mean_differences_xarray(ds, 3, where, layers).values, expected, rtol=1e-10,
                               atol=1e-12)


def test_diff_lens_restricts_pairs_and_layers_in_one_line(tmp_path):
    ds = _store_with_a_planted_difference(tmp_path, promoted=5, suppressed=2)
    result = diff_lens(ds, k=2, top=3, include_massive=True, pairs=["BB-SS"], layers=[1])
    assert list(result.pair.values) == ["BB-SS"] and list(result.layer.values) == [1]
    assert (result.promoted_id.isel(rank=0).values == 5).all()
    with pytest.raises(Exception, match="unknown layer 9; the store has 0, 1, 2"):
        diff_lens(ds, layers=[9])
    with pytest.raises(Exception, match="unknown pair 'XX-YY'"):
        diff_lens(ds, pairs=["XX-YY"])


def test_streamed_last_layer_counts_equal_a_plain_count(tiny_pair, tmp_path, monkeypatch):
    """The shift rate and the summary's mean KL, read region by region (analysis.compute.lens_sums), against plain loops
    over a ragged store of several prompt and token chunks, one prompt's statistics unfinished."""
    from analysis.compute import lens_sums
    from cli import main

    store = tmp_path / "r.zarr"
    prompts = ["The moon is bright tonight over the quiet sea.", "Yes", "Why is the sky blue at noon today?", "Hi",
               "Two plus two makes four, said the teacher to the class."]
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--chunk-prompts",
                 "2", "--top-k", "4", *[x for p in prompts for x in ("--prompt", p)]]) == 0
    zarr.open_group(str(store), mode="r+")["lens_done"][1] = False  # its ids must not count
    ds = open_store(store)
    assert lens_sums.applies(ds)
    got = shift_rate(ds).compute()
    counts = lens_sums.last_layer_counts(ds, [("BB", "SS")], ["BB-SS"]).compute().values.sum(axis=-1)
    top = ds.topk_id.sel(lens="norm").isel(layer=-1).values  # (pass, prompt, token, k), store order
    kl = ds.kl.sel(lens="norm", pair="BB-SS").isel(layer=-1).values
    passes, done = list(ds.pass_.values), ds.lens_done.values
    bounds = shift_rate_interval(ds, resamples=200, seed=4).compute()
    chosen = np.random.default_rng(4).integers(0, ds.sizes["prompt"], size=(200, ds.sizes["prompt"]))
    for q, (left, right) in enumerate(zip(ds.left.values, ds.right.values, strict=True)):
        shifted_p, real_p = np.zeros(ds.sizes["prompt"]), np.zeros(ds.sizes["prompt"])
        kl_sum = 0.0
        for p in range(ds.sizes["prompt"]):
            for t in range(int(ds.n_tokens.values[p]) if done[p] else 0):
                real_p[p] += 1
                shifted_p[p] += top[passes.index(right), p, t, 0] not in top[passes.index(left), p, t, :3]
                kl_sum += float(kl[p, t])
        shifted, real = shifted_p.sum(), real_p.sum()
        assert float(got.isel(pair=q)) == shifted / real
        rates = [shifted_p[rows].sum() / real_p[rows].sum() for rows in chosen if real_p[rows].sum() > 0]
        np.testing.assert_allclose(bounds.isel(pair=q).values, np.percentile(rates, [2.5, 97.5]), rtol=1e-12)
    with monkeypatch.context() as patched:  # a store read through xarray (not local): the same per-prompt counts
        patched.setattr(lens_sums, "applies", lambda ds: False)
        np.testing.assert_array_equal(shift_rate_interval(ds, resamples=200, seed=4).values, bounds.values)
        if (left, right) == ("BB", "SS"):
            assert counts[0] == shifted and counts[2] == real
            np.testing.assert_allclose(counts[1], kl_sum, rtol=1e-6)
    real_pt = (ds.token < ds.n_tokens) & ds.lens_done
    want = ds.kl.sel(lens="norm").where(real_pt).mean(["prompt", "token"]).transpose("pair", "layer")
    np.testing.assert_allclose(lens_sums.layer_means(ds, "kl", "norm").values, want.values, rtol=1e-6)
    per_prompt = lens_sums.layer_sums(ds, "kl", "norm").compute()  # each prompt's own sums, in store order
    want_p = ds.kl.sel(lens="norm").where(real_pt).sum("token").transpose("pair", "prompt", "layer")
    np.testing.assert_allclose(per_prompt["sum"].values, want_p.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(per_prompt["count"].values[:, 0], real_pt.sum("token").values)


def _plain_massive(ds, factor: float = 10.0) -> np.ndarray:
    """(prompt, token): over ``factor`` x the median norm of its pass, prompt and layer somewhere (a plain loop)."""
    resid = ds.resid.values.astype(np.float64)  # (pass, prompt, layer, token, dim)
    out = np.zeros((ds.sizes["prompt"], ds.sizes["token"]), bool)
    for p, n in enumerate(ds.n_tokens.values):
        norms = np.sqrt((resid[:, p, :, :n] ** 2).sum(-1))  # (pass, layer, token)
        out[p, :n] = (norms / np.median(norms, axis=-1, keepdims=True) > factor).any(axis=(0, 1))
    return out


@pytest.mark.parametrize("layers", [None, [2]])
def test_streamed_means_leave_out_massive_positions_found_while_reading(tmp_path, layers):
    """One pass finds the massive positions of each prompt and takes them out of the sums: the same means as a
    plain loop over the positions a plain search did not flag, sinks planted in several chunks and slabs."""
    from analysis.readouts.difflens import mean_differences
    from store.chunking import Chunking

    lengths = (23, 17, 17, 9, 4, 2, 1)
    path = write_tiny_store(tmp_path / "r.zarr", n_prompts=len(lengths), lengths=lengths, store_dtype="float16",
                            chunking=Chunking(prompt=2, layer=3, token=4))
    resid = zarr.open_group(str(path), mode="r+")["resid"]
    for row, token, first_layer in ((0, 13, 1), (1, 0, 2), (2, 0, 1), (3, 5, 0)):
        resid[:, row, first_layer:, token, :] = resid[:, row, first_layer:, token, :] * 300
    ds = open_store(path)
    massive = _plain_massive(ds)
    assert massive.sum() == 4  # the four sinks and nothing else
    rng = np.random.default_rng(2)
    keep_pt = rng.random((ds.sizes["prompt"], ds.sizes["token"])) > 0.2
    streamed = mean_differences(ds, 3, xr.DataArray(keep_pt, dims=("prompt", "token")), layers, massive_factor=10.0)
    assert "masked-sums" in str(streamed.data.dask.layers.keys())
    chosen = layers or [0, 1, 2]
    expected = _plain_mean_differences(ds, 3, keep_pt & ~massive, chosen)
    np.testing.assert_allclose(streamed.values, expected, rtol=1e-9, atol=1e-9)


def test_lens_extremes_equal_a_full_float64_ranking():
    """Candidates from a float32 product, ranked in float64: the same ids and values as sorting every float64
    logit of each row (random lens and rows; rows in several blocks)."""
    from analysis.readouts.difflens import NumpyLens
    from store.schema import LensHead

    rng = np.random.default_rng(3)
    vocab, dim = 500, 16
    lens = NumpyLens(weight_vd=rng.standard_normal((vocab, dim)).astype(np.float32),
                     bias_v=rng.standard_normal(vocab).astype(np.float32), head=LensHead("rmsnorm", 1e-6, 0.7, 30.0),
                     norm_weight=rng.random(dim) + 0.5, norm_bias=np.zeros(dim))
    h = rng.standard_normal((70, dim))
    ids, values = lens.extremes(h, top=7, rows=32)
    z = lens.logits(h)
    order = np.argsort(z, axis=-1, kind="stable")
    np.testing.assert_array_equal(ids[0], order[:, ::-1][:, :7])
    np.testing.assert_array_equal(ids[1], order[:, :7])
    np.testing.assert_allclose(values[0], np.take_along_axis(z, ids[0], -1), rtol=1e-12)
    np.testing.assert_allclose(values[1], np.take_along_axis(z, ids[1], -1), rtol=1e-12)


def test_an_exactly_zero_difference_lists_no_tokens(tmp_path):
    """A pair whose passes are the same (here BB and SB: SB set to BB) has a zero mean difference: ids -1 and
    NaN logits, not the first of a vocabulary of tied logits; the planted pair still reads back."""
    _store_with_a_planted_difference(tmp_path, promoted=5, suppressed=2)
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    group["resid"][2] = group["resid"][0]
    consolidate(tmp_path / "s.zarr")
    result = diff_lens(open_store(tmp_path / "s.zarr"), k=2, top=3, include_massive=True)
    zero = result.sel(pair="BB-SB")
    assert (zero.promoted_id.values == -1).all() and np.isnan(zero.promoted_logit.values).all()
    assert (result.sel(pair="BB-SS").promoted_id.isel(rank=0).values[1:] == 5).all()


def _write_checkpoint(folder, config: dict, with_bias: bool):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    folder.mkdir()
    (folder / "config.json").write_text(__import__("json").dumps(config))
    tensors = {"lm_head.weight": rng.standard_normal((11, HIDDEN)).astype(np.float32),
               "model.norm.weight": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32)}
    if with_bias:
        tensors["model.norm.bias"] = rng.standard_normal(HIDDEN).astype(np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    return tensors


@pytest.mark.parametrize("with_bias", [True, False])
def test_a_layernorm_checkpoint_of_an_unknown_type_is_read_as_layernorm(tmp_path, with_bias):
    """The checkpoint lens tells the norm from the config and tensors, not from a list of model types: a
    LayerNorm model at ``model.norm`` of any ``model_type`` is normalised by its mean and variance (float64
    reference per row), where a guess from the type read it as RMSNorm."""
    config = {"model_type": "someone_elses_lm", "layer_norm_eps": 1e-5}
    tensors = _write_checkpoint(tmp_path / "ckpt", config, with_bias)
    lens = _checkpoint_lens(str(tmp_path / "ckpt"))
    assert lens.head.norm_kind == "layernorm"
    h = np.random.default_rng(1).standard_normal((3, HIDDEN)) * 2 + 0.7
    bias = tensors.get("model.norm.bias", np.zeros(HIDDEN)).astype(np.float64)
    want = []
    for row in h:
        centered = row - row.mean()
        normed = centered / np.sqrt((centered ** 2).mean() + 1e-5) * tensors["model.norm.weight"] + bias
        want.append(tensors["lm_head.weight"].astype(np.float64) @ normed)
    np.testing.assert_allclose(lens.logits(h), np.array(want), rtol=1e-5, atol=1e-5)


def test_a_checkpoint_whose_norm_cannot_be_told_is_refused(tmp_path):
    from store.errors import UsageError

    _write_checkpoint(tmp_path / "ckpt", {"model_type": "someone_elses_lm"}, with_bias=False)
    with pytest.raises(UsageError, match="--save-lens"):
        _checkpoint_lens(str(tmp_path / "ckpt"))


def test_top_beyond_the_vocabulary_lists_every_token(tmp_path):
    """``--top`` larger than the vocabulary ranks the whole vocabulary (it failed with a shape error)."""
    ds = _store_with_a_planted_difference(tmp_path, promoted=5, suppressed=2)
    result = diff_lens(ds, k=2, top=50, include_massive=True)
    assert result.sizes["rank"] == HIDDEN
    cell = result.sel(pair="BB-SS")
    assert (cell.promoted_id.isel(rank=0).values == 5).all() and (cell.suppressed_id.isel(rank=0).values == 2).all()


def test_every_capture_records_its_lens_heads_as_the_models_compute_them(tiny_store, tiny_pair):
    """``lens_heads`` (every capture): each source's norm identified numerically on the loaded model."""
    from transformers import AutoModelForCausalLM

    from capture.lens.logit_lens import lens_head

    ds = open_store(tiny_store)
    recorded = ds.attrs["lens_heads"]
    assert set(recorded) == {"base", "sft"}
    for name in ("base", "sft"):
        model = AutoModelForCausalLM.from_pretrained(ds.attrs["models"][name]["ref"])
        assert recorded[name] == lens_head(model).attrs()


def test_the_recorded_head_is_used_over_a_guess_from_the_config(tmp_path, tiny_store):
    """A checkpoint whose config would be read as RMSNorm, recorded by the capture as LayerNorm: the recorded
    head decides (logits as a float64 LayerNorm reference); without a record, the guess."""
    from store.schema import LensHead

    config = {"model_type": "someone_elses_lm", "rms_norm_eps": 1e-6}
    tensors = _write_checkpoint(tmp_path / "ckpt", config, with_bias=False)
    assert _checkpoint_lens(str(tmp_path / "ckpt")).head.norm_kind == "rmsnorm"  # the guess
    lens = _checkpoint_lens(str(tmp_path / "ckpt"), LensHead("layernorm", 1e-5))
    h = np.random.default_rng(2).standard_normal((3, HIDDEN)) * 2 + 0.7
    centered = h - h.mean(axis=1, keepdims=True)
    normed = centered / np.sqrt((centered ** 2).mean(axis=1, keepdims=True) + 1e-5) * tensors["model.norm.weight"]
    np.testing.assert_allclose(lens.logits(h), normed @ tensors["lm_head.weight"].astype(np.float64).T, rtol=1e-6,
                               atol=1e-6)
    # through the store: load_lenses reads lens_heads where the store has no saved lens
    import json

    ds = open_store(tiny_store)
    without = ds.drop_vars([v for v in ds.data_vars if str(v).startswith("lens_")])
    without.attrs = {k: v for k, v in ds.attrs.items() if k != "saved_lens"}
    without.attrs["lens_heads"] = json.loads(json.dumps(ds.attrs["lens_heads"]))
    without.attrs["lens_heads"]["base"]["norm_eps"] = 0.5  # planted: only the record says so
    lenses, where = load_lenses(without)
    assert where == "the models' safetensors checkpoints"
    assert lenses["base"].head.norm_eps == 0.5 and lenses["sft"].head.norm_eps != 0.5
