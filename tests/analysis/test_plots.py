"""Figures and the self-contained HTML page, rendered in headless Chromium."""

from __future__ import annotations

import re

import pytest

from cli import main
from tests.helpers import chromium_dom

FIGURES = ("layer_curves", "heatmap_norm_diff_prompt1", "heatmap_norm_prompt1", "spectra", "effective_rank",
           "cp_factors")
PAGE_IMAGES = (*FIGURES, "factorial_shares")  # the page opens with the factorial plot


@pytest.fixture(scope="module")
def plotted(capture_store, tmp_path_factory):
    store = capture_store("qwen2", store_dtype="float16")
    out = tmp_path_factory.mktemp("plots")
    assert main(["plot", str(store), "--out", str(out), "--html", "--prompt-index", "1", "--quiet"]) == 0
    return out


def test_every_figure_is_a_png(plotted):
    for name in FIGURES:
        data = (plotted / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


@pytest.mark.browser
def test_html_renders_every_image_in_chromium(plotted, tmp_path):
    page = plotted / "report.html"
    text = page.read_text()
    assert text.count("data:image/png;base64,") == len(PAGE_IMAGES) and "<table>" in text and "src=\"http" not in text
    dom = chromium_dom(page, tmp_path / "profile")
    rendered = re.search(r'data-images-rendered="(\d+)/(\d+)"', dom)
    assert rendered, dom[:500]
    assert rendered.group(1) == rendered.group(2) == str(len(PAGE_IMAGES))
