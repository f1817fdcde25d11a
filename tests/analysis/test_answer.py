"""The report's opening: what changed, and the token view, rendered in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from cli import main
from store.reader import open_store

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(tiny_pair, tmp_path_factory):
    work = tmp_path_factory.mktemp("answer")
    store = work / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--save-lens",
                 "--prompt", "The moon is bright tonight.", "--prompt", "Why is the sky blue?"]) == 0
    assert main(["plot", str(store), "--html", "--quiet", "--out", str(work / "plots"), "--prompt-index", "1"]) == 0
    return store, work / "plots" / "report.html"


def test_the_page_opens_with_what_changed(page):
    store, report = page
    text = report.read_text()
    headings = re.findall(r"<h2>(.*?)</h2>", text)
    assert headings[:7] == ["Summary", "Massive activations", "Where the change is largest", "Embeddings or body?",
                            "Difference lens (BB-SS)", "Largest KL(BB-SS), norm lens", "Token view: prompt 1, pass SS"]
    summary = text[text.index("<h2>Summary</h2>"):text.index("<h2>Massive activations</h2>")]
    assert "Fine-tuning changed the residual stream" in summary and "KL(SS || BB) averages" in summary
    assert headings.index("Figures") > headings.index("Token view: prompt 1, pass SS")
    token_view = text[text.index('id="token-view"'):]
    token_view = token_view[:token_view.index("</table>")]
    assert "Ġ" not in token_view  # decoded text, never raw byte-level pieces
    ds = open_store(store)
    n = int(ds.n_tokens.sel(prompt=1))
    assert token_view.count("<tr>") == ds.sizes["layer"] + 1 and token_view.count("<td ") == n * ds.sizes["layer"]


@pytest.mark.browser
def test_the_token_view_renders_in_chromium(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium where apt-get can)")
    _, report = page
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400",
                    f"--screenshot={shot}", report.as_uri()], capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000
    dom = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}",
                          "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'id="token-view"' in dom and "rgba(220, 60, 40," in dom
    rendered = re.search(r'data-images-rendered="(\d+)/(\d+)"', dom)
    assert rendered and rendered.group(1) == rendered.group(2)


@pytest.mark.parametrize("name", ["kl", "topk_id", "token_id"])
def test_one_prompt_read_straight_from_the_files_is_the_stored_row(page, name):
    """The token view reads its prompt's row from the chunk files, not through the store's Dask graph: the
    same values, labels and dims (both where a direct reader applies and where it does not)."""
    import numpy as np

    from analysis.compute import lens_sums
    from analysis.report.answer import _prompt_row
    from store.reader import direct_regions

    ds = open_store(page[0])
    if name == "kl":
        assert direct_regions(ds[name]) is not None  # a ragged local store: the direct path is the one tested
    if name == "topk_id":  # integer ids have no region reads from open_store: the statistics' own are used
        assert direct_regions(ds[name]) is None and lens_sums.regions(ds, name) is not None
    for row in range(ds.sizes["prompt"]):
        got, want = _prompt_row(ds, name, row), ds[name].isel(prompt=row).compute()
        assert got.dims == want.dims
        np.testing.assert_array_equal(got.values, want.values)
        for dim in got.dims:
            if dim in want.coords:
                np.testing.assert_array_equal(got[dim].values, want[dim].values)


def test_largest_kl_read_by_runs_against_a_plain_loop(page):
    """The KL table's positions, read a run of prompt chunks at a time: the largest KL at real, kept positions
    of the layers with statistics, largest first, ties to the earliest (prompt, layer, token)."""
    import numpy as np

    from analysis.compute import lens_sums

    ds = open_store(page[0])
    assert lens_sums.applies(ds)
    kl = ds.kl.sel(lens="norm", pair="BB-SS").values  # (prompt, layer, token)
    keep = np.ones((ds.sizes["prompt"], ds.sizes["token"]), bool)
    keep[0, 1] = False  # a position left out
    cells = [(float(kl[p, la, t]), p, la, t) for p in range(ds.sizes["prompt"]) for la in range(ds.sizes["layer"])
             for t in range(int(ds.n_tokens.values[p])) if keep[p, t]]
    want = sorted(cells, key=lambda c: (-c[0], c[1], c[2], c[3]))[:5]
    got = lens_sums.largest(ds, "BB-SS", "kl", "norm", 5, keep)
    assert [tuple(int(v) for v in row[1:]) for row in got] == [c[1:] for c in want]
    np.testing.assert_allclose(got[:, 0], [c[0] for c in want], rtol=1e-7)
