"""Hotspots, correlations and seven-number summaries against plain Python over real positions."""

from __future__ import annotations

import math
import statistics

import dask
import numpy as np
import pytest

from analysis import correlation, hotspots, open_store, pair_metrics, seven_number_summary
from store.errors import UsageError
from store.testing import CountingScheduler


@pytest.fixture(scope="module")
def store(capture_store):
    return open_store(capture_store("qwen2"))


def _cells(ds, values_pqlt, q):
    """(value, prompt, layer, token) of every real position of pair q."""
    return [(float(values_pqlt[q, p, layer, t]), p, layer, t) for p in range(ds.sizes["prompt"])
            for layer in range(ds.sizes["layer"]) for t in range(int(ds.n_tokens.values[p]))]


def test_lazy(store):
    metrics = pair_metrics(store)
    with dask.config.set(scheduler=CountingScheduler(0)):
        results = [hotspots(metrics.norm_diff, 3), correlation(metrics.norm_diff, metrics.kl),
                   seven_number_summary(metrics.cosine_sim)]
    for result in results:
        for var in result.data_vars.values() if hasattr(result, "data_vars") else [result]:
            assert isinstance(var.data, dask.array.Array)


def test_hotspots_are_the_largest_magnitudes(store):
    metrics = pair_metrics(store)
    metric = metrics.norm_right - metrics.norm_left  # both signs present, no ties at the top
    got = hotspots(metric, top_n=4).compute()
    values = metric.values
    for q in range(store.sizes["pair"]):
        expected = sorted(_cells(store, values, q), key=lambda c: -abs(c[0]))[:4]
        assert [round(v, 5) for v in got.value.values[q]] == [round(c[0], 5) for c in expected]
        for r, (value, p, layer, t) in enumerate(expected):
            assert (got.prompt.values[q, r], got.layer.values[q, r], got.token.values[q, r]) == (p, layer, t)
            assert value == pytest.approx(float(values[q, p, layer, t]))
    with pytest.raises(UsageError, match="at least 1"):
        hotspots(metric, 0)


def test_correlation_over_real_positions(store):
    metrics = pair_metrics(store)
    got = correlation(metrics.norm_diff, metrics.kl).values
    a, b = metrics.norm_diff.values, metrics.kl.values
    for q in range(store.sizes["pair"]):
        xs = [c[0] for c in _cells(store, a, q)]
        ys = [c[0] for c in _cells(store, b, q)]
        assert got[q] == pytest.approx(statistics.correlation(xs, ys), rel=1e-6)


def test_seven_number_summary(store):
    metric = pair_metrics(store).kl
    got = seven_number_summary(metric).compute()
    values = metric.values
    for q in range(store.sizes["pair"]):
        per_prompt = [statistics.fmean(float(values[q, p, layer, t]) for layer in range(store.sizes["layer"])
                                       for t in range(int(store.n_tokens.values[p])))
                      for p in range(store.sizes["prompt"])]
        q1, median, q3 = statistics.quantiles(per_prompt, n=4, method="inclusive")
        expected = {"min": min(per_prompt), "q1": q1, "median": median, "q3": q3, "max": max(per_prompt),
                    "mean": statistics.fmean(per_prompt), "std": statistics.pstdev(per_prompt)}
        for name, value in expected.items():
            assert float(got[name].values[q]) == pytest.approx(value, rel=1e-6), name
    assert not any(math.isnan(float(v)) for v in got["median"].values)
    assert np.isfinite(got["std"].values).all()


def test_hotspot_ties_go_to_the_earliest_positions_however_chunked(tmp_path):
    from analysis import pass_metrics
    from store.chunking import Chunking
    from store.testing import write_tiny_store

    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=5, lengths=(9, 7, 4, 2, 1), n_layers1=3, hidden=4,
                            chunking=Chunking(prompt=2, layer=3, token=4))
    norm = pass_metrics(open_store(path)).norm.sel(pass_="BB", drop=True)
    flat = (norm * 0).where(norm.token > 0)  # every real value ties; token 0 left out, as a sink would be
    for metric in (flat, flat.chunk({"prompt": -1, "token": -1}), flat.compute()):
        got = hotspots(metric, top_n=4)
        assert got.value.values.tolist() == [0.0] * 4
        assert [(int(got.prompt[r]), int(got.layer[r]), int(got.token[r])) for r in range(4)] == [
            (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 0, 4)]
    few = hotspots(flat.isel(prompt=[3, 4]), top_n=4)  # one real position left (prompt 3, token 1) per layer
    assert np.isnan(few.value.values[3:]).all() and (few.prompt.values[3:] == -1).all()


@pytest.mark.parametrize("chunked", [False, True])
def test_position_sums_and_means_against_a_plain_loop(chunked):
    """Over real positions that a mask keeps and that are not NaN, per layer, with a pair axis in front; a layer
    where nothing counts is NaN. Chunked: blocks of prompts of uneven length."""
    import xarray as xr

    from analysis.compute.reductions import position_mean, position_sum

    rng = np.random.default_rng(4)
    n_tokens = np.array([6, 5, 3, 1])
    x = rng.standard_normal((2, 4, 3, 6))  # (pair, prompt, layer, token)
    x[:, 1, 0, 2] = np.nan  # a real position without a value
    x[:, :, 2] = np.nan  # a layer without any
    keep = rng.random((4, 6)) > 0.3
    values = xr.DataArray(x, dims=("pair", "prompt", "layer", "token"))
    if chunked:
        values = values.chunk({"prompt": 3})
    where = xr.DataArray(keep, dims=("prompt", "token"))
    want_sum, want_mean = np.full((2, 3), np.nan), np.full((2, 3), np.nan)
    for q in range(2):
        for la in range(3):
            cells = [x[q, p, la, t] for p in range(4) for t in range(n_tokens[p])
                     if keep[p, t] and not np.isnan(x[q, p, la, t])]
            if cells:
                want_sum[q, la], want_mean[q, la] = sum(cells), sum(cells) / len(cells)
    np.testing.assert_allclose(position_sum(values, n_tokens, where).values, want_sum, rtol=1e-12)
    np.testing.assert_allclose(position_mean(values, n_tokens, where).values, want_mean, rtol=1e-12)


@pytest.mark.parametrize("chunked", [False, True])
def test_summaries_over_kept_real_positions_against_a_plain_loop(chunked):
    """summarize_over (by layer and by token) and seven_number_summary at the real positions a mask keeps, with
    a pair axis in front, values not NaN only; a layer or token where nothing counts is NaN. Chunked: blocks of
    prompts of uneven length. Padding holds large finite values here, so a reduction that read it would show."""
    import xarray as xr

    from analysis import summarize_over

    rng = np.random.default_rng(5)
    n_tokens = np.array([6, 5, 3, 1, 2])
    x = rng.standard_normal((2, 5, 3, 7)) * 3 + 10  # (pair, prompt, layer, token); token 6 is never real
    for p, n in enumerate(n_tokens):
        x[:, p, :, n:] = 1e6
    x[:, 1, 0, 2] = np.nan  # a real position without a value
    x[:, :, 2] = np.nan  # a layer without any
    keep = rng.random((5, 7)) > 0.25
    keep[3] = False  # a prompt with nothing kept
    values = xr.DataArray(x, dims=("pair", "prompt", "layer", "token"))
    if chunked:  # layer tiles kept where tokens are reduced, merged where layers are
        values = values.chunk({"prompt": 2, "layer": 2, "token": 4})
    where = xr.DataArray(keep, dims=("prompt", "token"))

    def cells(q, p=None, layer=None, token=None):
        return [x[q, pp, la, t] for pp in range(5) for la in range(3) for t in range(n_tokens[pp])
                if (p is None or pp == p) and (layer is None or la == layer) and (token is None or t == token)
                and keep[pp, t] and not np.isnan(x[q, pp, la, t])]

    for axis, size in (("layer", 3), ("token", 7)):
        got = summarize_over(values, axis, n_tokens, where).compute()
        for q in range(2):
            for i in range(size):
                want = np.asarray(cells(q, **{axis: i}), dtype=np.float64)
                if want.size == 0:
                    assert all(np.isnan(got[k].values[q, i]) for k in ("mean", "std", "min", "max")), (axis, i)
                    continue
                np.testing.assert_allclose(got["mean"].values[q, i], want.mean(), rtol=1e-12)
                np.testing.assert_allclose(got["std"].values[q, i], want.std(), rtol=1e-10, atol=1e-12)
                assert (got["min"].values[q, i], got["max"].values[q, i]) == (want.min(), want.max())
        # the mean's 95% interval: resampled prompts (the module's draws), each resample's cells pooled
        bounds = summarize_over(values, axis, n_tokens, where, intervals=True, resamples=200, seed=2).compute()
        chosen = np.random.default_rng(2).integers(0, 5, size=(200, 5))
        for q in range(2):
            for i in range(size):
                means = [np.mean([c for p in rows for c in cells(q, p=p, **{axis: i})] or [np.nan]) for rows in chosen]
                if np.isnan(means).mean() > 0.025:  # undefined in too many resamples: no interval
                    assert np.isnan(bounds.mean_low.values[q, i]) and np.isnan(bounds.mean_high.values[q, i])
                    continue
                want = np.nanpercentile(means, [2.5, 97.5])
                np.testing.assert_allclose([bounds.mean_low.values[q, i], bounds.mean_high.values[q, i]], want,
                                           rtol=1e-10)
    seven = seven_number_summary(values, n_tokens, where).compute()
    for q in range(2):
        per_prompt = [statistics.fmean(c) for p in range(5) if (c := cells(q, p=p))]
        assert len(per_prompt) == 4  # prompt 3 has no kept position and no mean
        q1, median, q3 = statistics.quantiles(per_prompt, n=4, method="inclusive")
        want = {"min": min(per_prompt), "q1": q1, "median": median, "q3": q3, "max": max(per_prompt),
                "mean": statistics.fmean(per_prompt), "std": statistics.pstdev(per_prompt)}
        for name, value in want.items():
            assert float(seven[name].values[q]) == pytest.approx(value, rel=1e-12), name


@pytest.mark.parametrize("chunked", [False, True])
def test_hotspots_among_kept_positions_are_those_of_the_masked_metric(chunked):
    import xarray as xr

    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 5, 3, 6))
    x[:, 3, :, 2:] = np.nan  # padding
    keep = xr.DataArray(rng.random((5, 6)) > 0.4, dims=("prompt", "token"))
    values = xr.DataArray(x, dims=("pair", "prompt", "layer", "token"))
    if chunked:
        values = values.chunk({"prompt": 2})
    got = hotspots(values, 4, where=keep).compute()
    want = hotspots(values.where(keep), 4).compute()
    for name in ("value", "prompt", "layer", "token"):
        np.testing.assert_array_equal(got[name].values, want[name].values)
    kept = [(abs(x[q, p, la, t]), q) for q in range(2) for p in range(5) for la in range(3) for t in range(6)
            if keep.values[p, t] and not np.isnan(x[q, p, la, t])]
    assert np.abs(got.value.values[0, 0]) == pytest.approx(max(v for v, q in kept if q == 0), rel=1e-7)


def test_a_mask_over_more_axes_is_applied_to_the_metric():
    """A mask with a ``model_pair`` axis (stores stacked by ``open_stores``) gives what masking the metric gives."""
    import xarray as xr

    from analysis import summarize_over

    rng = np.random.default_rng(7)
    values = xr.DataArray(rng.standard_normal((2, 3, 2, 4)), dims=("model_pair", "prompt", "layer", "token"))
    where = xr.DataArray(rng.random((2, 3, 4)) > 0.3, dims=("model_pair", "prompt", "token"))
    n_tokens = np.array([4, 3, 2])
    masked = values.where(where)
    for got, want in ((summarize_over(values, "layer", n_tokens, where), summarize_over(masked, "layer", n_tokens)),
                      (seven_number_summary(values, n_tokens, where), seven_number_summary(masked, n_tokens)),
                      (hotspots(values, 3, where), hotspots(masked, 3))):
        for name in want.data_vars:
            np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-12)
