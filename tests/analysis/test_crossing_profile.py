"""The crossing profile (``analysis.crossing_profile``, ``cli.py crossing``) against plain float64 loops over
the stored values, against ground truth (a pair that differs from block k on), and its bootstrap intervals
against a plain resampling loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import open_store
from analysis.compute.bootstrap import draws, ratio_interval_np
from analysis.readouts.crossing import crossing_profile
from store.errors import MissingData
from tests.helpers import RAGGED, load

K, N_LAYERS = 2, 3


def _crossed_store(make_model, root, first_changed: int, splits: str, track=None, arch: str = "llama"):
    """A store of a pair of ``arch`` whose SFT model differs from the base from block ``first_changed`` on."""
    from transformers import AutoTokenizer

    from capture.models.loading import decoder_layers
    from capture.pipeline.job import run_capture
    from capture.settings import CaptureSettings

    base = make_model(arch, seed=0)
    model = load(base)
    torch.manual_seed(3)
    with torch.no_grad():
        for block in list(decoder_layers(model))[first_changed:]:
            for weight in block.parameters():
                weight.add_(0.05 * torch.randn_like(weight))
    model.save_pretrained(root / "sft")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "sft")
    path = run_capture(CaptureSettings(base=str(base), sft=str(root / "sft"), prompts=RAGGED, device="cpu",
                                       store=str(root / "s.zarr"), store_dtype="float32", top_k=2,
                                       cross_layers=splits, track=track or []),
                       log=lambda *a: None, progress=False)
    return open_store(path)


@pytest.fixture(scope="module")
def crossed(make_model, tmp_path_factory):
    """A pair whose SFT model differs from the base from block K on, crossed at every split."""
    return _crossed_store(make_model, tmp_path_factory.mktemp("crossed"), K, f"0:{N_LAYERS + 1}", ["5", "40"])


@pytest.fixture(scope="module")
def crossed_everywhere(make_model, tmp_path_factory):
    """A pair whose every block differs, crossed inside the body: both sides of a split carry some change."""
    return _crossed_store(make_model, tmp_path_factory.mktemp("everywhere"), 0, "1,2")


def _plain_sums(ds, keep=None):
    """Per split and direction, float64 sums over real kept positions, in loops: (kl, kl_ref, resid, resid_ref)."""
    resid = ds.resid.sel(layer=N_LAYERS).values.astype(np.float64)
    names = [str(p) for p in ds.pass_.values]
    kl = ds.kl.sel(lens="norm", layer=N_LAYERS)
    pairs = [str(q) for q in ds.pair.values]
    out = {}
    for split in range(N_LAYERS + 1):
        for direction, target in (("B>S", "SS"), ("S>B", "BB")):
            crossed = f"{direction}@{split}"
            sums = np.zeros(4)
            for row in range(ds.sizes["prompt"]):
                for t in range(int(ds.n_tokens.values[row])):
                    if keep is not None and not keep[row, t]:
                        continue
                    d = resid[names.index(target), row, t] - resid[names.index(crossed), row, t]
                    r = resid[names.index("SS"), row, t] - resid[names.index("BB"), row, t]
                    sums += [float(kl.values[pairs.index(f"{crossed}-{target}"), row, t]),
                             float(kl.values[pairs.index("BB-SS"), row, t]), float(d @ d), float(r @ r)]
            out[(split, direction)] = sums
    return out


def test_profile_equals_plain_sums_and_ground_truth(crossed):
    profile = crossing_profile(crossed).compute()
    plain = _plain_sums(crossed)
    n_real = int(crossed.n_tokens.sum())
    for (split, direction), (kl, kl_ref, resid, resid_ref) in plain.items():
        at = profile.sel(split=split, direction=direction)
        assert float(at.kl) == pytest.approx(kl / n_real, rel=1e-5, abs=1e-9)
        assert float(at.kl_share) == pytest.approx(kl / kl_ref, rel=1e-5, abs=1e-9)
        assert float(at.resid_share) == pytest.approx(resid / resid_ref, rel=1e-9, abs=1e-12)
        if split <= K:  # the change lives in blocks K..: crossing at or below K leaves none of it
            assert float(at.resid_share) == 0.0 and abs(float(at.kl_share)) < 1e-6
            assert float(at.resid_share_low) == float(at.resid_share_high) == 0.0
        else:
            assert float(at.resid_share) > 0.01
            assert float(at.resid_share_low) <= float(at.resid_share) <= float(at.resid_share_high)


def test_massive_positions_left_out_count_nowhere(crossed):
    import xarray as xr

    keep_pt = np.asarray(crossed.token.values[None, :] > 0).repeat(crossed.sizes["prompt"], 0)  # drop token 0
    keep = xr.DataArray(keep_pt, dims=("prompt", "token"), coords={"prompt": crossed.prompt})
    profile = crossing_profile(crossed, keep).compute()
    for (split, direction), (_, _, resid, resid_ref) in _plain_sums(crossed, keep_pt).items():
        assert float(profile.resid_share.sel(split=split, direction=direction)) == pytest.approx(resid / resid_ref)


def test_bootstrap_interval_equals_a_plain_loop():
    rng = np.random.default_rng(5)
    num, den = rng.random(40), rng.random(40) + 0.5
    chosen = draws(40, 200, 11)
    ratios = [num[row].sum() / den[row].sum() for row in chosen]
    np.testing.assert_allclose(ratio_interval_np(num, den, chosen), np.percentile(ratios, [2.5, 97.5]))


def test_profile_is_lazy_and_refuses_stores_without_crossings(crossed, capture_store):
    import dask

    from store.testing import CountingScheduler

    with dask.config.set(scheduler=CountingScheduler(0)):
        profile = crossing_profile(crossed)
    assert profile.kl_share.chunks is not None
    with pytest.raises(MissingData, match="crossed passes"):
        crossing_profile(open_store(capture_store("llama")))


def test_cli_prints_the_profile(crossed, capsys, tmp_path):
    import json

    from cli import main

    export = tmp_path / "profile.json"
    assert main(["crossing", crossed.encoding["source"], "--resamples", "50", "--export", str(export)]) == 0
    rows = json.loads(export.read_text())
    per_split = [r for r in rows if r["table"] == "split"]
    assert [r["split"] for r in per_split] == list(range(N_LAYERS + 1))
    assert all(r["kl_interaction_low"] <= r["kl_interaction"] <= r["kl_interaction_high"] for r in per_split)
    out = capsys.readouterr().out
    assert "split  direction" in out and "B>S@L" in out and "bootstrap interval over prompts, 50 resamples" in out
    assert main(["crossing", crossed.encoding["source"], "--resamples", "3"]) != 0


def test_plot_draws_the_profile(crossed, tmp_path):
    from cli import main

    out = tmp_path / "plots"
    assert main(["plot", crossed.encoding["source"], "--out", str(out), "--quiet"]) == 0
    assert (out / "crossing_profile.png").read_bytes()[:4] == b"\x89PNG"


def test_interactions_equal_plain_loops(crossed):
    profile = crossing_profile(crossed).compute()
    assert list(profile.tracked_str.values) == list(crossed.tracked_str.values)  # named
    resid = crossed.resid.sel(layer=N_LAYERS).values.astype(np.float64)
    logits = crossed.tracked_logit.sel(lens="norm", layer=N_LAYERS).values.astype(np.float64)
    names = [str(p) for p in crossed.pass_.values]
    at = names.index
    for split in range(N_LAYERS + 1):
        inter, ref, tracked, n = 0.0, 0.0, np.zeros(2), 0
        for row in range(crossed.sizes["prompt"]):
            for t in range(int(crossed.n_tokens.values[row])):
                cells = [at("SS"), at(f"B>S@{split}"), at(f"S>B@{split}"), at("BB")]
                ss, bs, sb, bb = (resid[c, row, t] for c in cells)
                d = ss - bs - sb + bb
                r = resid[at("SS"), row, t] - resid[at("BB"), row, t]
                inter, ref = inter + d @ d, ref + r @ r
                tracked += (logits[cells[0], row, t] - logits[cells[1], row, t] - logits[cells[2], row, t]
                            + logits[cells[3], row, t])
                n += 1
        assert float(profile.interaction_share.sel(split=split)) == pytest.approx(inter / ref, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(profile.tracked_interaction.sel(split=split).values, tracked / n, rtol=1e-5,
                                   atol=1e-7)
        if split <= K:  # B>S@L is SS and S>B@L is BB: no interaction
            assert float(profile.interaction_share.sel(split=split)) == 0.0


@pytest.mark.parametrize("store", ["crossed", "crossed_everywhere"])
def test_kl_interaction_equals_plain_loops_and_ground_truth(store, request):
    """KL(SS || BB) - KL(B>S@L || BB) - KL(S>B@L || BB) per position, from the stored pairs in loops. Where the
    change lives above the split, the crossed passes are SS and BB themselves, so the new pairs repeat BB-SS (in
    its direction: KL is not symmetric) and BB-BB, and the interaction is 0; where both sides of the split
    changed, it is not."""
    ds = request.getfixturevalue(store)
    profile = crossing_profile(ds).compute()
    kl = ds.kl.sel(lens="norm", layer=N_LAYERS).values.astype(np.float64)
    pairs = [str(q) for q in ds.pair.values]
    n_real = int(ds.n_tokens.sum())
    real = ds.token < ds.n_tokens
    for split in (int(s) for s in profile.split.values):
        upper, lower = pairs.index(f"BB-B>S@{split}"), pairs.index(f"BB-S>B@{split}")
        inter = ref = 0.0
        for row in range(ds.sizes["prompt"]):
            for t in range(int(ds.n_tokens.values[row])):
                ref += kl[pairs.index("BB-SS"), row, t]
                inter += kl[pairs.index("BB-SS"), row, t] - kl[upper, row, t] - kl[lower, row, t]
        at = profile.sel(split=split)
        assert float(at.kl_interaction) == pytest.approx(inter / n_real, rel=1e-5, abs=1e-9)
        assert float(at.kl_interaction_share) == pytest.approx(inter / ref, rel=1e-5, abs=1e-9)
        assert float(at.kl_interaction_low) <= float(at.kl_interaction) <= float(at.kl_interaction_high)
        if store == "crossed" and split <= K:
            same = ds.kl.sel(lens="norm", layer=N_LAYERS, pair=f"BB-B>S@{split}").where(real)
            np.testing.assert_allclose(same.values, ds.kl.sel(lens="norm", layer=N_LAYERS, pair="BB-SS")
                                       .where(real).values, rtol=1e-5, atol=1e-7)
        if store == "crossed":  # at split n the crossings are BB and SS with the other head, the same here
            assert abs(float(at.kl_interaction_share)) < 1e-5
        else:
            assert abs(float(at.kl_interaction_share)) > 1e-3
            assert float(at.interaction_share) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma"])
def test_every_statistic_equals_plain_loops_on_other_architectures(arch, make_model, tmp_path):
    """Each statistic of the profile against float64 loops over the stored residuals and KL, position by position,
    on pairs of other architectures that differ in every block (so that nothing is 0)."""
    ds = _crossed_store(make_model, tmp_path, 0, "1,2", arch=arch)
    profile = crossing_profile(ds).compute()
    resid = ds.resid.sel(layer=N_LAYERS).values.astype(np.float64)
    kl = ds.kl.sel(lens="norm", layer=N_LAYERS).values.astype(np.float64)
    at = {str(p): i for i, p in enumerate(ds.pass_.values)}
    pair = {str(q): i for i, q in enumerate(ds.pair.values)}
    positions = [(row, t) for row in range(ds.sizes["prompt"]) for t in range(int(ds.n_tokens.values[row]))]
    ref_resid = sum(float(np.sum((resid[at["SS"], r, t] - resid[at["BB"], r, t]) ** 2)) for r, t in positions)
    ref_kl = sum(kl[pair["BB-SS"], r, t] for r, t in positions)
    for split in (1, 2):
        bs, sb = at[f"B>S@{split}"], at[f"S>B@{split}"]
        inter = sum(float(np.sum((resid[at["SS"], r, t] - resid[bs, r, t] - resid[sb, r, t] + resid[at["BB"], r, t])
                                 ** 2)) for r, t in positions)
        kl_inter = sum(kl[pair["BB-SS"], r, t] - kl[pair[f"BB-B>S@{split}"], r, t] - kl[pair[f"BB-S>B@{split}"], r, t]
                       for r, t in positions)
        got = profile.sel(split=split)
        assert float(got.interaction_share) == pytest.approx(inter / ref_resid, rel=1e-9)
        assert float(got.kl_interaction) == pytest.approx(kl_inter / len(positions), rel=1e-5, abs=1e-9)
        assert float(got.kl_interaction_share) == pytest.approx(kl_inter / ref_kl, rel=1e-5, abs=1e-9)
        for direction, target, crossed in (("B>S", "SS", bs), ("S>B", "BB", sb)):
            left = sum(float(np.sum((resid[at[target], r, t] - resid[crossed, r, t]) ** 2)) for r, t in positions)
            kl_left = sum(kl[pair[f"{direction}@{split}-{target}"], r, t] for r, t in positions)
            one = got.sel(direction=direction)
            assert float(one.resid_share) == pytest.approx(left / ref_resid, rel=1e-9)
            assert float(one.kl) == pytest.approx(kl_left / len(positions), rel=1e-5, abs=1e-9)
            assert float(one.kl_share) == pytest.approx(kl_left / ref_kl, rel=1e-5, abs=1e-9)
            assert float(one.resid_share) > 1e-3


def test_intervals_over_many_prompts_hold_a_block_of_draws_not_all():
    """100,000 prompts: the draws of 1000 resamples would be 800 MB; drawn a block at a time (the same numbers as
    all at once), the computation holds a few tens of MB."""
    import tracemalloc

    from analysis.compute.bootstrap import seeded_interval_np

    rng = np.random.default_rng(0)
    num, den = rng.random(100_000), rng.random(100_000) + 0.5
    tracemalloc.start()
    got = seeded_interval_np(num, den, 1000, 2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20, peak
    assert got.shape == (2,) and got[0] < num.sum() / den.sum() < got[1]
    small = seeded_interval_np(num[:50], den[:50], 300, 9)
    np.testing.assert_array_equal(small, ratio_interval_np(num[:50], den[:50], draws(50, 300, 9)))
