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
    assert main(["plot", str(store), "--html", "--quiet", "--out", str(work / "plots"), "--prompt", "1"]) == 0
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
