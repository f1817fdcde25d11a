"""Lazy metrics against plain float64 numpy, position by position; padding never leaks."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from analysis import open_store, pair_metrics, pass_metrics, summarize_over
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.errors import UsageError
from store.testing import CountingScheduler, write_tiny_store
from tests.helpers import PROMPTS


@pytest.fixture(scope="module")
def store(capture_store):
    # PROMPTS has a 1-2 token prompt beside long ones: padding dominates some rows.
    return open_store(capture_store("llama"))


def _real_positions(ds):
    for prompt in range(ds.sizes["prompt"]):
        for token in range(int(ds.n_tokens.values[prompt])):
            yield prompt, token


def test_everything_is_lazy(store):
    with dask.config.set(scheduler=CountingScheduler(0)):
        per_pass, per_pair = pass_metrics(store), pair_metrics(store, lens="norm")
        summary = summarize_over(per_pair.norm_diff, "token")
        for var in [*per_pass.data_vars.values(), *per_pair.data_vars.values(), *summary.data_vars.values()]:
            assert isinstance(var.data, dask.array.Array)
    assert summary["mean"].dtype == np.float32


def test_pass_metrics_match_numpy(store):
    resid = store.resid.values.astype(np.float64)
    got = pass_metrics(store).compute()
    for p in range(store.sizes["pass_"]):
        for prompt, token in _real_positions(store):
            for layer in range(store.sizes["layer"]):
                h = resid[p, prompt, layer, token]
                np.testing.assert_allclose(got.norm.values[p, prompt, layer, token], np.linalg.norm(h), rtol=1e-5)
                if layer == 0:
                    assert np.isnan(got.norm_delta.values[p, prompt, 0, token])
                    continue
                prev = resid[p, prompt, layer - 1, token]
                np.testing.assert_allclose(got.norm_delta.values[p, prompt, layer, token],
                                           np.linalg.norm(h) - np.linalg.norm(prev), rtol=1e-5, atol=1e-5)
                cos = h @ prev / (np.linalg.norm(h) * np.linalg.norm(prev))
                # float32 sums: a cosine near 0 has an absolute, not a relative, precision
                np.testing.assert_allclose(got.cosine_prev.values[p, prompt, layer, token], cos, rtol=1e-5, atol=1e-6)
    n = store.n_tokens.values
    for prompt in range(store.sizes["prompt"]):
        assert np.isnan(got.norm.values[:, prompt, :, n[prompt]:]).all()


@pytest.mark.parametrize("lens", ["raw", "norm"])
def test_pair_metrics_match_numpy(store, lens):
    resid = store.resid.values.astype(np.float64)
    index = {p: i for i, p in enumerate(store.pass_.values)}
    got = pair_metrics(store, lens=lens).compute()
    kl, entropy = store.kl.sel(lens=lens).values, store.entropy.sel(lens=lens).values
    target = store.target_logprob.sel(lens=lens).values
    assert list(got.pair.values) == list(store.pair.values)
    for q, (left, right) in enumerate(zip(store.left.values, store.right.values, strict=True)):
        li, ri = index[left], index[right]
        for prompt, token in _real_positions(store):
            for layer in range(store.sizes["layer"]):
                a, b = resid[li, prompt, layer, token], resid[ri, prompt, layer, token]
                at = (q, prompt, layer, token)
                np.testing.assert_allclose(got.norm_diff.values[at], np.linalg.norm(b - a), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got.cosine_sim.values[at],
                                           a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got.norm_left.values[at], np.linalg.norm(a), rtol=1e-5)
                np.testing.assert_allclose(got.norm_right.values[at], np.linalg.norm(b), rtol=1e-5)
                assert got.kl.values[at] == kl[at]
                assert got.entropy_right.values[at] == entropy[ri, prompt, layer, token]
                left_lp, right_lp = (target[i, prompt, layer, token] for i in (li, ri))
                np.testing.assert_allclose(got.logprob_diff.values[at], np.float64(right_lp) - np.float64(left_lp),
                                           rtol=1e-6, atol=1e-6, equal_nan=True)
                assert np.isnan(got.logprob_diff.values[at]) == (token == store.n_tokens.values[prompt] - 1)


def test_summaries_skip_padding(store):
    """The reference walks real positions only, so padding cannot enter it."""
    metric = pair_metrics(store).norm_diff
    values, n_tokens = metric.values, store.n_tokens.values
    n_prompt, n_layer, n_token = store.sizes["prompt"], store.sizes["layer"], store.sizes["token"]
    for axis, size in (("layer", n_layer), ("token", n_token)):
        summary = summarize_over(metric, axis).compute()
        for q in range(store.sizes["pair"]):
            for i in range(size):
                if axis == "layer":
                    cells = [values[q, p, i, t] for p in range(n_prompt) for t in range(n_tokens[p])]
                else:
                    cells = [values[q, p, layer, i] for p in range(n_prompt) if i < n_tokens[p]
                             for layer in range(n_layer)]
                cells = np.asarray(cells, dtype=np.float64)
                assert cells.size > 0
                np.testing.assert_allclose(summary["mean"].values[q, i], cells.mean(), rtol=1e-5)
                np.testing.assert_allclose(summary["std"].values[q, i], cells.std(), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(summary["min"].values[q, i], cells.min(), rtol=1e-6)
                np.testing.assert_allclose(summary["max"].values[q, i], cells.max(), rtol=1e-6)


def test_statistics_only_stores_use_their_stored_metrics(store, tmp_path):
    from cli import main

    path = store.attrs["capture_settings"]["store"]
    assert main(["export-json", path, "--out", str(tmp_path / "o")]) == 0
    (exported,) = (tmp_path / "o").rglob("multi_pass_*.json")
    assert main(["import-json", str(exported), "--store", str(tmp_path / "i.zarr")]) == 0
    imported = open_store(tmp_path / "i.zarr")
    per_pair = pair_metrics(imported).compute()
    np.testing.assert_array_equal(per_pair.norm_diff.values, imported.norm_diff.values)
    # The legacy key k is our layer k + 1: the stored value there matches our own metric on the full store.
    ours = pair_metrics(store).norm_diff.sel(layer=1, prompt=imported.prompt.values).values  # by label
    np.testing.assert_allclose(per_pair.norm_diff.sel(layer=1).values, ours, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert sorted(pass_metrics(imported).data_vars) == ["cosine_prev", "norm", "norm_delta"]


def test_open_stores_stacks_compatible_stores(store, make_model, tmp_path):
    from analysis import open_stores

    other = tmp_path / "other.zarr"
    settings = CaptureSettings(base=str(make_model("llama", seed=2)), sft=str(make_model("llama", seed=3)),
                               prompts=PROMPTS, store=str(other), store_dtype="float32", device="cpu", top_k=2)
    run_capture(settings, log=lambda *a: None, progress=False)
    path = store.attrs["capture_settings"]["store"]
    with dask.config.set(scheduler=CountingScheduler(0)):
        both = open_stores([path, other], names=["first", "second"])
        metric = pair_metrics(both).norm_diff
    assert metric.dims == ("model_pair", "pair", "prompt", "layer", "token")
    np.testing.assert_array_equal(metric.sel(model_pair="first").values, pair_metrics(store).norm_diff.values)
    short = tmp_path / "short.zarr"
    run_capture(CaptureSettings(**{**settings.__dict__, "store": str(short), "prompts": PROMPTS[:2]}),
                log=lambda *a: None, progress=False)
    with pytest.raises(UsageError, match="cannot be combined: prompt is 4 vs 2"):
        open_stores([path, short])


def test_open_stores_names_two_stores_of_one_pair_by_their_files(tmp_path):
    from analysis import open_stores

    a = write_tiny_store(tmp_path / "a" / "run.zarr")
    b = write_tiny_store(tmp_path / "b" / "other.zarr", seed=1)
    combined = open_stores([a, b])
    assert combined.model_pair.values.tolist() == ["run", "other"]
    same = open_stores([a, write_tiny_store(tmp_path / "c" / "run.zarr", seed=2)])
    assert same.model_pair.values.tolist() == ["run-1", "run-2"]


def test_a_store_from_before_target_logprob_says_what_it_lacks(store):
    """Stores captured before 2026-12-07 have no target_logprob: the other metrics work, asking for it is one
    line that says why and what to do, never a number."""
    from analysis.report.text import build_report
    from store.errors import MissingData

    old = store.drop_vars("target_logprob")
    assert "logprob_diff" not in pair_metrics(old, lens="norm") and "kl" in pair_metrics(old, lens="norm")
    for record_type, metric in (("pairwise", "logprob_diff"), ("runs", "target_logprob")):
        with pytest.raises(MissingData, match=r"no target_logprob .* capture again") as caught:
            build_report(old, metrics=[metric], record_type=record_type)
        assert "\n" not in str(caught.value)
