"""The 2x2 factorial against a float64 reference, and on pairs with a known answer."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from analysis.readouts.factorial import factorial, factorial_shares, tracked_factorial
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.errors import MissingData
from store.reader import open_store
from store.testing import CountingScheduler, write_tiny_store
from tests.helpers import PROMPTS, load


def _reference(ds):
    """Plain float64, position by position."""
    h = {p: ds.resid.sel(pass_=p).values.astype(np.float64) for p in ("BB", "BS", "SB", "SS")}
    d = h["SS"] - h["BB"]
    e = ((h["SB"] - h["BB"]) + (h["SS"] - h["BS"])) / 2
    b = ((h["BS"] - h["BB"]) + (h["SS"] - h["SB"])) / 2
    i = h["SS"] - h["SB"] - h["BS"] + h["BB"]
    return d, e, b, i


def test_norms_and_shares_match_a_float64_reference(tmp_path):
    ds = open_store(write_tiny_store(tmp_path / "s.zarr", n_prompts=5, lengths=(5, 2, 4, 1, 3), chunk_prompt=2))
    with dask.config.set(scheduler=CountingScheduler(0)):  # building is lazy
        norms, shares = factorial(ds), factorial_shares(ds)
    d, e, b, i = _reference(ds)
    np.testing.assert_allclose(d, e + b, atol=1e-12, equal_nan=True)  # D = E + B
    for name, x in (("total_norm", d), ("embedding_norm", e), ("body_norm", b), ("interaction_norm", i)):
        np.testing.assert_allclose(norms[name].values, np.sqrt((x**2).sum(-1)), rtol=1e-6, equal_nan=True)
    shares = shares.compute()
    total = np.nansum((d**2).sum(-1), axis=(0, 2))
    np.testing.assert_allclose(shares.embedding_share, np.nansum((e**2).sum(-1), axis=(0, 2)) / total, rtol=1e-10)
    np.testing.assert_allclose(shares.body_share, np.nansum((b**2).sum(-1), axis=(0, 2)) / total, rtol=1e-10)
    np.testing.assert_allclose(shares.cross_share, 2 * np.nansum((e * b).sum(-1), axis=(0, 2)) / total, rtol=1e-10)
    np.testing.assert_allclose(shares.interaction_ratio, np.nansum((i**2).sum(-1), axis=(0, 2)) / total, rtol=1e-10)
    np.testing.assert_allclose(shares.embedding_share + shares.body_share + shares.cross_share, 1.0, rtol=1e-12)


def _swap_pair(make_model, tmp_path, keep: str):
    """A base and an SFT model that differ only in their input embeddings (keep="body") or only in their body
    (keep="embeddings"): the other part is copied from the base."""
    base_dir, other_dir = make_model("llama", seed=0), make_model("llama", seed=1)
    base, sft = load(base_dir), load(other_dir)
    if keep == "body":
        sft.load_state_dict({**base.state_dict(), "model.embed_tokens.weight": sft.model.embed_tokens.weight})
    else:
        sft.model.embed_tokens.weight.data.copy_(base.model.embed_tokens.weight.data)
    out = tmp_path / f"sft-{keep}"
    sft.save_pretrained(out)
    (out / "tokenizer.json").write_bytes((base_dir / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (base_dir / name).exists():
            (out / name).write_bytes((base_dir / name).read_bytes())
    settings = CaptureSettings(base=str(base_dir), sft=str(out), prompts=PROMPTS, store=str(tmp_path / f"{keep}.zarr"),
                               store_dtype="float32", device="cpu", top_k=2, track=["7"])
    return open_store(run_capture(settings, log=lambda *a: None, progress=False))


def test_a_pair_that_differs_only_in_its_embeddings_has_no_body_effect(make_model, tmp_path):
    ds = _swap_pair(make_model, tmp_path, keep="body")
    shares = factorial_shares(ds).compute()
    assert (shares.body_share.values == 0).all() and (shares.interaction_ratio.values == 0).all()
    np.testing.assert_allclose(shares.embedding_share.values, 1.0, rtol=1e-12)
    assert float(np.nanmax(factorial(ds).body_norm.values)) == 0.0
    effects = tracked_factorial(ds).compute()
    assert float(np.nanmax(np.abs(effects.body_effect.values))) == 0.0


def test_a_pair_that_differs_only_in_its_body_has_no_embedding_effect(make_model, tmp_path):
    ds = _swap_pair(make_model, tmp_path, keep="embeddings")
    shares = factorial_shares(ds).compute()
    assert (shares.embedding_share.values[1:] == 0).all() and (shares.interaction_ratio.values[1:] == 0).all()
    np.testing.assert_allclose(shares.body_share.values[1:], 1.0, rtol=1e-12)
    assert np.isnan(shares.body_share.values[0])  # layer 0: nothing changed at all, so no shares


def test_a_store_without_the_four_passes_is_a_one_line_error(tmp_path):
    from store.testing import tiny_template
    from store.writer import StoreWriter

    template = tiny_template().isel(pass_=[0, 3])
    StoreWriter.create(tmp_path / "s.zarr", template)
    with pytest.raises(MissingData, match="needs the four standard passes BB, BS, SB and SS"):
        factorial(open_store(tmp_path / "s.zarr"))


def test_exactly_zero_pairs_decompose_and_plot_without_a_traceback(make_model, tmp_path, capsys):
    """Frozen embeddings make BB-SB and BS-SS exactly zero: defined results, not a LinAlgError."""
    import xarray as xr

    from cli import main

    ds = _swap_pair(make_model, tmp_path, keep="embeddings")
    store = ds.attrs["capture_settings"]["store"]
    assert main(["decompose", store, "--quiet", "--out", str(tmp_path / "d.zarr")]) == 0
    out = capsys.readouterr().out
    assert ("pairs BB-SB, BS-SS: no difference at any layer (exactly 0: their passes differ only in the input "
            "embedding, so the input embeddings are identical)") in out
    assert "pairs BB-BS, BB-SS, BS-SB, SB-SS: the same spectrum and directions at every layer" in out
    rows = [line for line in out.splitlines() if line.lstrip().startswith("BB-BS = BB-SS = BS-SB = SB-SS ")]
    assert len(rows) == ds.sizes["layer"]  # one table for the four, a row per layer
    result = xr.open_zarr(tmp_path / "d.zarr").load()
    for zero in ("BB-SB", "BS-SS"):
        assert (result.singular_value.sel(pair=zero).values == 0).all()
        assert (result.rank90.sel(pair=zero).values == 0).all()
        assert (result.cp_pair.sel(pair=zero).values == 0).all()
    assert (result.singular_value.sel(pair="BB-SS").values[1:] > 0).any()
    assert np.isnan(result.principal_angle.sel(pair="BB-SB").values).all()
    assert main(["plot", store, "--quiet", "--out", str(tmp_path / "plots"), "--html"]) == 0
    assert (tmp_path / "plots" / "report.html").exists()


def test_the_cli_turns_a_library_exception_into_one_line(tmp_path, capsys, monkeypatch):
    import analysis.report.text
    from cli import main

    store = write_tiny_store(tmp_path / "s.zarr")

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(analysis.report.text, "build_report", broken)
    assert main(["report", str(store)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: LinAlgError: Singular matrix (in ") and err.count("\n") == 1
    assert main(["--debug", "report", str(store)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_groups_by_role_and_kind_partition_the_total(tiny_pair, tmp_path):
    from analysis.readouts.tokens import token_kinds
    from cli import main

    store = tmp_path / "chat.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--no-lens",
                 "--chat-template", "--prompt", "Why is the sky blue?", "--prompt", "Name a red fruit."]) == 0
    ds = open_store(store)
    overall = factorial_shares(ds).compute()
    for by in ("role", token_kinds(ds)):
        grouped = factorial_shares(ds, by=by).compute()
        name = by if isinstance(by, str) else "kind"
        assert len(grouped[name]) >= 2
        np.testing.assert_allclose(grouped.total_sq.sum(name).values, overall.total_sq.values, rtol=1e-12)
    kinds = token_kinds(ds).values
    assert set(kinds[kinds != ""]) == {"special", "text"}
    assert main(["factorial", str(store), "--by", "kind"]) == 0


def test_terms_from_the_six_distances_equal_the_direct_sums(tmp_path):
    """The summary's factorial (from the pair sums a report computes anyway) against the direct per-position
    terms, summed per layer: the same numbers to rounding."""
    from analysis.geometry.metrics import _residual_sums, store_pass_pairs
    from analysis.readouts.factorial import factorial_terms, terms_from_distances

    ds = open_store(write_tiny_store(tmp_path / "s.zarr", n_prompts=5, n_layers1=3, hidden=8))
    names, left, right = store_pass_pairs(ds)
    per_layer = _residual_sums(ds)[2].sum(["prompt", "token"])
    derived = terms_from_distances({frozenset((a, b)): per_layer.sel(pair=q, drop=True)
                                    for q, a, b in zip(names, left, right, strict=True)}).compute()
    direct = factorial_terms(ds).sum(["prompt", "token"]).compute()
    np.testing.assert_allclose(derived.values, direct.transpose("term", "layer").values, rtol=1e-9, atol=1e-9)


def test_share_intervals_equal_a_plain_resampling_loop(tmp_path):
    """Each share's 95% interval against resampled prompts in a loop (float64 sums per prompt from the residuals),
    with the draws the module documents: ``default_rng(seed).integers(0, P, (resamples, P))``."""
    ds = open_store(write_tiny_store(tmp_path / "s.zarr", n_prompts=9, lengths=(5, 2, 4, 1, 3, 6, 2, 5, 3),
                                     chunk_prompt=2))
    shares = factorial_shares(ds, resamples=300, seed=7).compute()
    d, e, b, i = _reference(ds)
    per_prompt = {"total": np.nansum((d**2).sum(-1), axis=2),  # (prompt, layer)
                  "embedding_share": np.nansum((e**2).sum(-1), axis=2), "body_share": np.nansum((b**2).sum(-1), axis=2),
                  "cross_share": 2 * np.nansum((e * b).sum(-1), axis=2),
                  "interaction_ratio": np.nansum((i**2).sum(-1), axis=2)}
    chosen = np.random.default_rng(7).integers(0, 9, size=(300, 9))
    for name in ("embedding_share", "body_share", "cross_share", "interaction_ratio"):
        ratios = np.array([per_prompt[name][rows].sum(0) / per_prompt["total"][rows].sum(0) for rows in chosen])
        np.testing.assert_allclose(shares[f"{name}_low"], np.percentile(ratios, 2.5, axis=0), rtol=1e-9)
        np.testing.assert_allclose(shares[f"{name}_high"], np.percentile(ratios, 97.5, axis=0), rtol=1e-9)
        assert (shares[f"{name}_low"] <= shares[name]).all() and (shares[name] <= shares[f"{name}_high"]).all()
    assert factorial_shares(ds, intervals=False).compute().data_vars.keys() == {
        "embedding_share", "body_share", "cross_share", "interaction_ratio", "total_sq"}


def test_factorial_cli_prints_and_exports_intervals(tmp_path, capsys):
    import json

    from cli import main

    store = write_tiny_store(tmp_path / "s.zarr", n_prompts=6)
    out = tmp_path / "shares.json"
    assert main(["factorial", str(store), "--resamples", "100", "--seed", "3", "--export", str(out)]) == 0
    text = capsys.readouterr().out
    assert "95% bootstrap interval over prompts, 100 resamples, seed 3" in text and ".." in text
    rows = json.loads(out.read_text())
    shares = factorial_shares(open_store(store), resamples=100, seed=3).compute()
    assert [r["layer"] for r in rows] == [int(x) for x in shares.layer.values]
    assert rows[0]["body_share_high"] == pytest.approx(float(shares.body_share_high[0]))
    assert main(["factorial", str(store), "--export", str(tmp_path / "no" / "x.csv")]) == 2


def test_one_prompt_gives_no_interval(tmp_path, capsys):
    """Resampling one prompt gives the same number every time: an interval of zero width would claim certainty,
    so there is none (NaN in the API, a dash in the table)."""
    from cli import main

    store = write_tiny_store(tmp_path / "s.zarr", n_prompts=1)
    shares = factorial_shares(open_store(store)).compute()
    assert np.isfinite(shares.body_share).all() and np.isnan(shares.body_share_low).all()
    assert main(["factorial", str(store)]) == 0
    assert "(–)" in capsys.readouterr().out
