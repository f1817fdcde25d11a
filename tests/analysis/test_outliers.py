"""Massive activations found on a planted outlier, left out of summaries; the scale-free rel_norm_diff."""

from __future__ import annotations

import dask
import numpy as np
import zarr

from analysis import open_store, pair_metrics
from analysis.geometry.outliers import massive_positions, norm_ratio
from analysis.report.text import build_report
from store.testing import CountingScheduler, write_tiny_store


def _planted(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr", n_prompts=4, lengths=(6, 5, 6, 4), chunk_prompt=2, n_layers1=4)
    resid = zarr.open_group(str(path), mode="r+")["resid"]
    block = resid[:, 1, 2:, 0, :]  # store row 1, its first token, from layer 2 on: an attention sink
    resid[:, 1, 2:, 0, :] = block * 300
    return open_store(path)


def test_a_planted_sink_is_found_and_nothing_else(tmp_path):
    ds = _planted(tmp_path)
    with dask.config.set(scheduler=CountingScheduler(0)):
        found = massive_positions(ds)
    found = found.compute()
    label = int(ds.prompt.values[1])
    massive = found.massive.sel(prompt=label).values
    assert massive[0] and not massive[1:].any()
    assert int(found.massive.sum()) == 1 and float(found.peak_ratio.sel(prompt=label).values[0]) > 100
    # the ratio is the norm over the median of the same pass, prompt and layer (plain reference)
    h = ds.resid.values.astype(np.float64)
    norms = np.sqrt((h**2).sum(-1))
    want = norms / np.nanmedian(norms, axis=-1, keepdims=True)
    np.testing.assert_allclose(norm_ratio(ds).values, want, rtol=1e-5, equal_nan=True)
    # the peak is the largest ratio over passes and layers, NaN on padding
    with np.errstate(all="ignore"):
        peak = np.nanmax(np.where(np.isnan(want), -np.inf, want), axis=(0, 2))
    np.testing.assert_allclose(found.peak_ratio.values, np.where(np.isinf(peak), np.nan, peak), rtol=1e-5,
                               equal_nan=True)


def test_reports_list_the_sink_and_leave_it_out(tmp_path):
    ds = _planted(tmp_path)
    text, rows = build_report(ds, top_n=3)
    assert "\nmassive activations: 1 positions over 10x" in text and "token 0" in text
    assert text.startswith("Summary: ")
    label = int(ds.prompt.values[1])
    assert not any(r["prompt"] == label and r["token_idx"] == 0 for r in rows if r["type"] == "hotspot")
    kept, kept_rows = build_report(ds, top_n=3, include_massive=True)
    assert any(r["prompt"] == label and r["token_idx"] == 0 for r in kept_rows if r["type"] == "hotspot")
    assert "kept in the summaries" in kept


def test_rel_norm_diff_is_the_difference_over_the_left_norm(tmp_path):
    ds = open_store(write_tiny_store(tmp_path / "s.zarr"))
    got = pair_metrics(ds).rel_norm_diff.sel(pair="BB-SS").values
    left, right = (ds.resid.sel(pass_=p).values.astype(np.float64) for p in ("BB", "SS"))
    want = np.sqrt(((right - left) ** 2).sum(-1)) / np.sqrt((left**2).sum(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, equal_nan=True)


def test_spectra_leave_the_sink_out_unless_asked(tmp_path):
    import xarray as xr

    from analysis.geometry.decompose import decompose_store

    ds = _planted(tmp_path)
    path = ds.encoding.get("source") or str(tmp_path / "s.zarr")
    without, _ = decompose_store(path, top_k=2, cp_rank=1, out=tmp_path / "a.zarr")
    with_sink, _ = decompose_store(path, top_k=2, cp_rank=1, out=tmp_path / "b.zarr", include_massive=True)
    top = {name: xr.open_zarr(p).singular_value.sel(pair="BB-SS").isel(component=0).values
           for name, p in (("without", without), ("with", with_sink))}
    assert (top["with"][2:] > 20 * top["without"][2:]).all()  # the sink's layers: one position dominates
    # Before the sink's layers the position is ordinary: leaving it out changes the spectrum by one row's worth.
    np.testing.assert_allclose(top["with"][:2], top["without"][:2], rtol=0.05)
