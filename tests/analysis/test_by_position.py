"""The real-positions layout (``layout="positions"``) gives the padded layout's numbers, to the last bit.

Metrics of a ragged store laid out over its real positions only (``analysis.compute.ragged_sums``)
go through the per-prompt reductions of ``analysis.compute.by_position``; every reduction, the
massive-activation search, the factorial sums, the report's text and the HTML page must equal
those of the padded layout, which have their own plain float64 references.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr

import analysis.compute.ragged_sums as ragged_sums
from analysis import open_store
from analysis.compute.reductions import hotspots, position_mean, position_sum, prompt_sums, seven_number_summary
from analysis.geometry.metrics import pair_metrics, pass_metrics, positions_apply, summarize_over
from analysis.geometry.outliers import massive_positions
from analysis.readouts.factorial import factorial_shares, factorial_sums
from store.chunking import Chunking
from store.testing import fill_lens_statistics, save_identity_lens, write_tiny_store

LENGTHS = (13, 11, 9, 6, 5, 3, 2, 1, 1)  # store order: longest first
GEOMETRIC = ["norm_diff", "rel_norm_diff", "cosine_sim", "norm_left", "cosine_prev_right", "norm_delta_left"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = write_tiny_store(tmp_path_factory.mktemp("positions") / "s.zarr", n_prompts=len(LENGTHS),
                            lengths=LENGTHS, n_layers1=4, hidden=6, store_dtype="float16",
                            chunking=Chunking(prompt=2, layer=4, token=4))
    return save_identity_lens(fill_lens_statistics(path, vocab=100))


@pytest.fixture
def small_runs(monkeypatch):
    """Runs of a prompt chunk or two, so that the layout has several blocks."""
    monkeypatch.setattr(ragged_sums, "RUN_BYTES", 3000)


@pytest.fixture
def keep(path):
    ds = open_store(path)
    rng = np.random.default_rng(1)
    return xr.DataArray(rng.random((ds.sizes["prompt"], ds.sizes["token"])) > 0.2, dims=("prompt", "token"))


def _same(a, b) -> None:
    (a, b) = dask.compute(a, b)
    drop = (lambda x: x.reset_coords(drop=True)) if isinstance(a, (xr.Dataset, xr.DataArray)) else (lambda x: x)
    xr.testing.assert_equal(drop(a), drop(b))


def test_the_layout_holds_the_real_positions_only(path, small_runs):
    ds = open_store(path)
    norm = pass_metrics(ds, layout="positions").norm
    assert norm.dims == ("pass_", "layer", "position")
    assert norm.sizes["position"] == int(ds.n_tokens.sum())
    assert len(norm.chunks[-1]) > 1  # several runs
    padded = pass_metrics(ds).norm.compute()
    picked = np.moveaxis(padded.values, 2, 1)[..., norm.row.values, norm.token.values]  # (pass_, layer, position)
    np.testing.assert_array_equal(picked, norm.values)
    assert not np.isnan(norm.sel(layer=norm.layer[1:]).values).any()  # no padding in it


@pytest.mark.parametrize("axis", ["layer", "token"])
def test_summaries_equal_the_padded_layouts(path, small_runs, keep, axis):
    ds = open_store(path)
    padded, positions = pair_metrics(ds, names=GEOMETRIC), pair_metrics(ds, names=GEOMETRIC, layout="positions")
    n_tokens = ds.n_tokens.values
    for m in GEOMETRIC:
        assert "position" in positions[m].dims
        for where in (None, keep, keep.chunk({"prompt": 3})):
            _same(summarize_over(padded[m], axis, n_tokens, where, intervals=True),
                  summarize_over(positions[m], axis, n_tokens, where, intervals=True))
        _same(seven_number_summary(padded[m], n_tokens, keep), seven_number_summary(positions[m], n_tokens, keep))
        for reduce in (position_mean, position_sum, prompt_sums):
            _same(reduce(padded[m], n_tokens, keep), reduce(positions[m], n_tokens, keep))


def test_blocks_that_split_a_prompt_are_realigned(path, small_runs, keep):
    ds = open_store(path)
    padded = pair_metrics(ds, names=["norm_diff"]).norm_diff
    split = pair_metrics(ds, names=["norm_diff"], layout="positions").norm_diff.chunk({"position": 5})
    n_tokens = ds.n_tokens.values
    _same(summarize_over(padded, "layer", n_tokens, keep), summarize_over(split, "layer", n_tokens, keep))
    _same(hotspots(padded, 6, keep), hotspots(split, 6, keep))


def test_hotspots_equal_the_padded_layouts(path, small_runs, keep):
    ds = open_store(path)
    padded, positions = pair_metrics(ds, names=GEOMETRIC), pair_metrics(ds, names=GEOMETRIC, layout="positions")
    for m in GEOMETRIC:
        for top_n in (1, 7, 500):  # 500: more than the real positions, the rest -1 / NaN
            _same(hotspots(padded[m], top_n, keep), hotspots(positions[m], top_n, keep))


def test_hotspot_ties_go_to_the_earlier_position_in_either_layout():
    n_tokens = np.array([3, 2, 2])
    values = np.full((3, 2, 3), np.nan)  # (prompt, layer, token): every real value ties at 1 but one
    for p, n in enumerate(n_tokens):
        values[p, :, :n] = 1.0
    values[2, 1, 1] = -2.0
    padded = xr.DataArray(values, dims=("prompt", "layer", "token")).chunk({"prompt": 1})
    rows, tokens = ragged_sums.position_index(n_tokens, 3)
    flat = xr.DataArray(np.moveaxis(values[rows, :, tokens], 0, 1), dims=("layer", "position"),
                        coords={"row": ("position", rows), "token": ("position", tokens), "token_slots": 3})
    positions = flat.chunk({"position": (3, 4)})
    spots = hotspots(positions, 4).compute()
    _same(hotspots(padded, 4), spots)
    assert spots.value.values.tolist() == [-2.0, 1.0, 1.0, 1.0]
    assert list(zip(spots.prompt.values, spots.layer.values, spots.token.values, strict=True)) == [
        (2, 1, 1), (0, 0, 0), (0, 0, 1), (0, 0, 2)]


def test_massive_positions_and_factorial_equal_the_padded_layouts(path, small_runs, keep):
    ds = open_store(path)
    _same(massive_positions(ds, 1.5), massive_positions(ds, 1.5, layout="positions"))
    assert bool(massive_positions(ds, 1.5).massive.any())  # the factor finds some: the comparison is not empty
    for over in (("prompt", "token"), ("token",), ("prompt",)):
        _same(factorial_sums(ds, over, keep), factorial_sums(ds, over, keep, layout="positions"))
    _same(factorial_shares(ds, where=keep), factorial_shares(ds, where=keep, layout="positions"))


def test_lens_metrics_keep_the_padded_layout(path):
    ds = open_store(path)
    assert positions_apply(ds, ["norm_diff"]) and not positions_apply(ds, ["norm_diff", "kl"])
    assert pair_metrics(ds, "norm", ["norm_diff", "kl"], layout="positions").kl.dims == (
        "pair", "prompt", "layer", "token")


@pytest.mark.slow
def test_the_report_and_the_page_are_the_same_in_either_layout(path, small_runs, monkeypatch, tmp_path):
    import analysis.report.page as page
    import analysis.report.plots as plots
    import analysis.report.text as text
    from analysis.report.page import PlotRequest, write_plots

    ds = open_store(path)
    outputs = []
    for layout in ("positions", "padded"):
        if layout == "padded":
            for module in (text, page, plots):
                monkeypatch.setattr(module, "layout_for", lambda ds, names: "padded")
        report = text.build_report(ds, top_n=4)
        out = tmp_path / layout
        write_plots(ds, PlotRequest(store=str(path), out=str(out), html=True, progress=False))
        outputs.append((report, (out / "report.html").read_text()))
    assert outputs[0] == outputs[1]


def test_the_pages_difference_lens_reads_less_and_says_the_same(path, monkeypatch):
    """The page's section asks for one pair, the last layers and the first window: a token chunk per prompt
    read, the same numbers as that slice of the full difference lens."""
    from analysis.compute import regions
    from analysis.readouts.difflens import diff_lens

    ds = open_store(path)
    massive = massive_positions(ds, 1.5).massive.compute()
    layers = [int(la) for la in ds.layer.values[-2:]]
    full = diff_lens(ds, k=2, top=3, massive=massive)
    read = []
    materialize = regions.materialize
    monkeypatch.setattr(regions, "materialize", lambda r: read.append(materialize(r).shape) or materialize(r))
    import analysis.compute.masked_sums as masked_sums
    monkeypatch.setattr(masked_sums, "materialize", regions.materialize)
    part = diff_lens(ds, k=2, top=3, massive=massive, pairs=["BB-SS"], layers=layers, windows=("first",))
    xr.testing.assert_identical(part, full.sel(pair=["BB-SS"], layer=layers, window=["first"]))
    chunk_token = ds.resid.data.chunks[3][0]
    assert read and all(shape[3] == chunk_token for shape in read)  # (pass, prompt, layer, token, dim)


def test_an_unknown_layout_is_a_usage_error(path):
    from store.errors import UsageError

    ds = open_store(path)
    for call in (lambda: pair_metrics(ds, names=["norm_diff"], layout="ragged"),
                 lambda: pass_metrics(ds, layout="ragged"), lambda: massive_positions(ds, layout="ragged"),
                 lambda: factorial_sums(ds, layout="ragged")):
        with pytest.raises(UsageError, match="layout must be one of padded, positions"):
            call()
