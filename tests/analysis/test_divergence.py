"""Readouts over generated responses against plain float64 loops over the models' own logits: the first
divergence, the per-position KL, log-prob difference and shift rate, the curve, the means around the first
divergence; and the report's section."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import open_store
from analysis.readouts.divergence import (
    around_divergence,
    first_divergence,
    response_curve,
    response_readouts,
)
from store.errors import MissingData
from tests.helpers import RAGGED, load

NEW = 7


@pytest.fixture(scope="module")
def generated(capture_store, make_model):
    """A store of a random llama pair whose SFT model wrote the responses, and plain per-position references
    from each model alone (BB: the base model, SS: the SFT model), in float64."""
    path = capture_store("llama", prompts=RAGGED, generate=NEW, top_k=3)
    ds = open_store(path)
    models = {"BB": load(make_model("llama", seed=0)), "SS": load(make_model("llama", seed=1))}
    reference = {}
    for row, label in enumerate(ds.prompt.values.tolist()):
        start, n = int(ds.response_start.values[row]), int(ds.n_tokens.values[row])
        ids = ds.token_id.values[row, :n].tolist()
        with torch.no_grad():
            logp = {k: torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), -1) for k, m in models.items()}
        per = []
        for j in range(n - start):
            t = start + j - 1
            top = {k: torch.argsort(v[t], descending=True)[:3].tolist() for k, v in logp.items()}
            kl = float((logp["SS"][t].exp() * (logp["SS"][t] - logp["BB"][t])).sum())
            written = ids[t + 1]
            assert top["SS"][0] == written  # ground truth: the SFT model wrote its own greedy tokens
            per.append({"kl": kl, "logprob_diff": float(logp["SS"][t, written] - logp["BB"][t, written]),
                        "shifted": float(top["SS"][0] not in top["BB"]), "diverged": top["SS"][0] != top["BB"][0]})
        reference[label] = per
    return ds, reference


def test_readouts_equal_a_plain_loop(generated):
    ds, reference = generated
    got = response_readouts(ds).sel(pair="BB-SS").compute()
    for label, per in reference.items():
        row = got.sel(prompt=label)
        for j, want in enumerate(per):
            at = row.isel(response=j)
            assert float(at.kl) == pytest.approx(want["kl"], abs=1e-4, rel=1e-3), (label, j)
            assert float(at.logprob_diff) == pytest.approx(want["logprob_diff"], abs=1e-4, rel=1e-3), (label, j)
            assert float(at.shifted) == want["shifted"] and bool(at.diverged) == want["diverged"], (label, j)
        assert np.isnan(row.kl.values[len(per):]).all()  # past the response: nothing, not 0


def test_first_divergence_equals_a_plain_loop(generated):
    ds, reference = generated
    first = first_divergence(ds).sel(pair="BB-SS").compute()
    for label, per in reference.items():
        want = next((j for j, p in enumerate(per) if p["diverged"]), -1)
        assert int(first.sel(prompt=label)) == want, label


def test_curve_and_around_divergence_are_plain_means(generated):
    ds, reference = generated
    curve = response_curve(ds).sel(pair="BB-SS").compute()
    for j in range(curve.sizes["response"]):
        values = [per[j] for per in reference.values() if j < len(per)]
        assert int(curve.n[j]) == len(values)
        for name, key in (("kl", "kl"), ("logprob_diff", "logprob_diff"), ("shift_rate", "shifted")):
            want = np.mean([v[key] for v in values]) if values else np.nan
            np.testing.assert_allclose(float(curve[name][j]), want, rtol=1e-3, atol=1e-4)
    # each mean's interval: resampled prompts (store rows, the module's draws), each resample's pooled mean
    rows = [reference[int(label)] for label in ds.prompt.values]
    chosen = np.random.default_rng(0).integers(0, len(rows), size=(1000, len(rows)))
    for j in range(3):
        for name, key in (("kl", "kl"), ("shift_rate", "shifted")):
            means = [np.mean([rows[r][j][key] for r in draw if j < len(rows[r])] or [np.nan]) for draw in chosen]
            if np.isnan(means).mean() > 0.025:
                assert np.isnan(float(curve[f"{name}_low"][j]))
                continue
            np.testing.assert_allclose([float(curve[f"{name}_low"][j]), float(curve[f"{name}_high"][j])],
                                       np.nanpercentile(means, [2.5, 97.5]), rtol=1e-3, atol=1e-4)
    around = around_divergence(ds, "BB-SS", before=1, after=2).compute()
    for offset in (-1, 0, 1, 2):
        values = []
        for per in reference.values():
            first = next((j for j, p in enumerate(per) if p["diverged"]), -1)
            if first >= 0 and 0 <= first + offset < len(per):
                values.append(per[first + offset]["kl"])
        assert int(around.n.sel(offset=offset)) == len(values)
        if values:
            assert float(around.kl.sel(offset=offset)) == pytest.approx(np.mean(values), rel=1e-3, abs=1e-4)


def test_readouts_are_lazy(generated):
    import dask

    from store.testing import CountingScheduler

    ds, _ = generated
    with dask.config.set(scheduler=CountingScheduler(0)):
        readouts = response_readouts(ds)
        curve, first = response_curve(ds, readouts), first_divergence(ds)
        around_divergence(ds, "BB-SS", readouts=readouts)
    assert curve.kl.chunks is not None and first.chunks is not None


def test_report_shows_the_curve_and_the_divergences(generated):
    from analysis.report.text import build_report

    ds, reference = generated
    text, _ = build_report(ds, top_n=3)
    section = text[text.index("responses (generated by the sft model"):]
    assert "shallow-alignment curve, BB-SS" in section and "first divergences" in section
    n_diverged = sum(any(p["diverged"] for p in per) for per in reference.values())
    assert section.splitlines()[1].startswith(f"{n_diverged} of {len(reference)} responses")


def test_stores_without_responses_or_top3_are_refused(capture_store):
    with pytest.raises(MissingData, match="generated responses"):
        response_readouts(open_store(capture_store("llama", top_k=3)))
    with pytest.raises(MissingData, match="top-3"):
        response_readouts(open_store(capture_store("llama", prompts=RAGGED[:2], generate=2, top_k=2)))


@pytest.mark.browser
def test_html_page_shows_the_curve_and_the_divergence_table(generated, tmp_path):
    import re

    from cli import main
    from tests.helpers import chromium_dom

    ds, reference = generated
    out = tmp_path / "plots"
    assert main(["plot", ds.encoding["source"], "--out", str(out), "--html", "--quiet"]) == 0
    assert (out / "response_curves.png").read_bytes()[:4] == b"\x89PNG"
    dom = chromium_dom(out / "report.html", tmp_path / "profile")
    section = dom[dom.index("What the model says: responses (BB-SS)"):]
    table = section[: section.index("</table>")]
    n_diverged = sum(any(p["diverged"] for p in per) for per in reference.values())
    assert table.count("<tr>") == 1 + n_diverged  # the header, then a row per diverging response
    rendered = re.search(r'data-images-rendered="(\d+)/(\d+)"', dom)
    assert rendered and rendered.group(1) == rendered.group(2)
    assert 'alt="response_curves"' in section
