"""``plot``: the figures of a store and, with ``--html``, the page that opens with what changed.

The numbers come from as few reads as the memory limit allows: the curves' inputs and the massive
positions in one computation, the page's tables in another, the decomposition (reused when its
settings match) in its own; the figures are drawn from the computed numbers.
"""

from __future__ import annotations

import base64
import contextlib
import html
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import xarray as xr

from analysis.geometry.decompose import decompose_store
from analysis.geometry.metrics import layout_for, pair_metrics
from analysis.geometry.outliers import massive_positions
from analysis.readouts.crossing import crossing_profile, crossing_splits
from analysis.report import plots, responses_text
from analysis.report.answer import chat_templating, opening, page_inputs
from analysis.report.summary import headline_pair, summary_sentences
from analysis.report.text import check_prompt
from store.atomic import staged_directory
from store.completeness import LEFT_OUT_ATTR, UNFINISHED_LENS_ATTR, left_out
from store.location import local_sibling


@dataclass(frozen=True)
class PlotRequest:
    """What ``plot`` draws (the command's options)."""

    store: str
    out: str | None = None  # default: the store's sibling NAME-plots
    metric: str = "norm_diff"  # pair metric of the heatmaps
    pass_metric: str | None = "norm"  # pass metric of the per-pass heatmaps (None or empty: none)
    prompt: int = 0  # the heatmaps' prompt
    lens: str = "norm"
    top_k: int = 8  # principal directions of the decomposition
    include_massive: bool = False
    html: bool = False
    progress: bool = True


def write_plots(ds: xr.Dataset, request: PlotRequest,
                computing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> list[Path]:
    """Write the figures (and report.html) of ``ds``; returns the paths written, all or nothing.

    ``computing()`` is the context each computation runs in (``cli.py``: ``--memory-limit`` or a cluster).
    """
    check_prompt(ds, request.prompt)
    final = Path(request.out) if request.out else local_sibling(request.store, "-plots")
    with staged_directory(final) as out:  # a run that fails adds nothing to the folder
        with computing():
            # over real positions only where the store allows: the same numbers, without the padding's work
            layout = layout_for(ds, ["rel_norm_diff"])
            found = massive_positions(ds, layout=layout)
            # the curves' numbers and the massive positions (for the heatmaps, the spectra and the page) in one
            # computation; the page's tables with them over real positions (one read of the residuals: their
            # sums are a fifteenth of the padded ones), else in a second (all at once held 2 GB at a 1 GB limit)
            lazy = {"found": found, "curves": plots.layer_curve_inputs(ds, request.lens)}
            if request.html and layout == "positions":
                lazy["page"] = _page_inputs(ds, None if request.include_massive else ~found.massive, layout)
            with warnings.catch_warnings():  # a layer without values has no mean: NaN, not drawn
                warnings.filterwarnings("ignore", "(invalid value|Mean of empty|All-NaN)", RuntimeWarning)
                (computed,) = dask.compute(lazy)
                found = computed["found"]
                keep = None if request.include_massive else ~found.massive
                if crossing_splits(ds):  # the depth profile of the crossed passes (--cross-layers)
                    (computed["crossing"],) = dask.compute(crossing_profile(ds, keep))
                if request.html and "page" not in computed:
                    (computed["page"],) = dask.compute(_page_inputs(ds, keep, layout))
            images = _figures(ds, out, request, computed["curves"], found)
            if "crossing" in computed:
                images.append(plots.crossing_plot(computed["crossing"], out))
            path, _ = decompose_store(request.store, top_k=request.top_k, progress=request.progress,
                                      include_massive=request.include_massive, massive=found.massive.values)
        result = xr.open_zarr(str(path)).load()
        images += plots.spectra_plots(result, out)
        images.append(plots.cp_plot(result, out))
        if request.html:
            images.append(_page(ds, request, out, images, result, found, computed["page"], computing))
            images += [p for p in [out / "response_curves.png"] if p.exists()]  # drawn in the page's section
    return [final / Path(image).relative_to(out) for image in images]


def _page_inputs(ds: xr.Dataset, keep: xr.DataArray | None, layout: str) -> dict:
    # the opening's metrics are geometric: built without graphs over the statistics variables
    lazy = page_inputs(ds, pair_metrics(ds, "norm", ["rel_norm_diff"], layout), keep, layout)
    if responses_text.applies(ds):  # read with the page's tables, not on its own
        lazy["responses"] = responses_text.response_inputs(ds)
    return lazy


def _figures(ds: xr.Dataset, out: Path, request: PlotRequest, curves, found) -> list:
    images = [plots.layer_curves(ds, out, request.lens, curves)]
    massive = None if request.include_massive else found.massive.sel(prompt=request.prompt).values
    images.append(plots.heatmaps(ds, out, request.metric, request.prompt, request.lens, massive))
    if request.pass_metric:
        images.append(plots.heatmaps(ds, out, request.pass_metric, request.prompt, request.lens, massive))
    return images


def _page(ds: xr.Dataset, request: PlotRequest, out: Path, images: list, result: xr.Dataset, found,
          computed: dict, computing: Callable[[], contextlib.AbstractContextManager]):
    """report.html: the opening (what changed first), the summary, the figures; ``computed``: the page's
    inputs (:func:`analysis.report.answer.page_inputs`), computed."""

    def ratio(q) -> str:
        value = float(result.participation_ratio.sel(pair=q).mean())
        return f"{value:.2f}" if np.isfinite(value) else "– (no difference)"

    rows = [["pair", "mean participation ratio", "max rank90", "max rank99"]] + [
        [str(q), ratio(q), int(result.rank90.sel(pair=q).max()), int(result.rank99.sel(pair=q).max())]
        for q in result.pair.values]
    with computing():  # (the opening's metrics were computed with the page's inputs: no graph of them to build)
        sections, first = opening(ds, None, out, request.prompt, found,
                                  request.include_massive, computed)
    summary = summary_sentences(ds, computed["summary"], int(found.massive.sum()), not request.include_massive)
    sections.insert(0, "<h2>Summary</h2><p>" + html.escape(" ".join(summary)) + "</p>")
    if "responses" in computed:
        sections.append(_responses_section(ds, out, computed["responses"]))
    if left_out(ds):
        sections.insert(0, f'<p class="note"><b>Note:</b> {html.escape(left_out(ds))}</p>')
    settings = {"store": str(request.store), "chat template": chat_templating(ds),
                **{k: v for k, v in ds.attrs.items() if k not in (LEFT_OUT_ATTR, UNFINISHED_LENS_ATTR)}}
    return plots.html_report(images, out, f"resdiff: {ds.attrs.get('pair_label', request.store)}", rows, settings,
                             sections, first)


def _responses_section(ds: xr.Dataset, out: Path, computed: dict, limit: int = 20) -> str:
    """The page's section on generated responses: the shallow-alignment curve and the first divergences with
    the response text on both sides."""
    figure = plots.response_curves(computed["curve"], out)
    pair, left, right = headline_pair(ds)
    rows = responses_text.divergence_rows(ds, computed, limit)
    head = ["prompt", "position", "response before", "written", f"{left} top-1", f"{right} top-1", "response after"]
    # the text before a divergence ends at it and the text after starts there: right- and left-aligned
    align = ["right"] * 3 + ["center"] * 3 + ["left"]
    cells = lambda row: "".join(f'<td style="text-align:{a};white-space:pre">{html.escape(str(c))}</td>'  # noqa: E731
                                for a, c in zip(align, row, strict=True))
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join(f"<tr>{cells(row)}</tr>" for row in rows) + "</table>") if rows else \
        f"<p>{html.escape(left)} and {html.escape(right)} choose the same greedy token at every response position.</p>"
    first = np.asarray(computed["first"].values)
    image = base64.b64encode(figure.read_bytes()).decode()
    return (f"<h2>What the model says: responses ({pair})</h2>"
            f"<p>{int((first >= 0).sum())} of {first.size} responses diverge; position j predicts the response's "
            f"token j under the norm lens at the last layer (the models' output).</p>"
            f'<figure><img alt="response_curves" src="data:image/png;base64,{image}">'
            f"<figcaption>the shallow-alignment curve: by response position</figcaption></figure>"
            f"<h3>First divergences (earliest first, up to {limit})</h3>{table}")
