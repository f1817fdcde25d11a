"""The opening of the HTML report: what changed, in a few tables and one picture, before the figures.

Sections (each skipped when the store lacks what it needs): the massive-activation
positions found; the layers with the largest relative change (``rel_norm_diff``, massive
positions left out); the factorial shares by layer (a stacked plot); the tokens the mean
BB-SS difference promotes and suppresses; the positions with the largest KL, with their
context; and a token view of one prompt: a layers x tokens table whose cells show the SS
pass's top norm-lens token as text, coloured by KL(SS || BB). Token text is decoded
(`` the``, not ``Ġthe``).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import xarray as xr

from analysis.readouts.tokens import token_texts, visible
from analysis.report.tables import estimate_of
from store.schema import lens_layers


def _cell(value) -> str:
    """A table cell: floats to 4 significant digits; a NaN (nothing to compute there) as a dash, never "nan"."""
    if isinstance(value, float):
        return f"{value:.4g}" if np.isfinite(value) else "–"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def chat_templating(ds: xr.Dataset) -> str:
    """Which prompts the chat template rendered, from the store itself (what the page's settings state)."""
    if "chat_templated" in ds.coords:
        n = int(np.asarray(ds.chat_templated.values).sum())
    else:  # stores before ``chat_templated``: a role per token meant every prompt was rendered
        n = ds.sizes["prompt"] if "role" in ds.coords else 0
    return f"applied to {n} of {ds.sizes['prompt']} prompts"


def _pair(ds: xr.Dataset, pairs: list[str]) -> str:
    return "BB-SS" if "BB-SS" in pairs else pairs[0]


def page_inputs(ds: xr.Dataset, metrics: xr.Dataset, keep: xr.DataArray | None, layout: str = "padded") -> dict:
    """The lazy numbers of the opening's tables and of the page's summary: computed together (with the layer
    curves, ``plots.layer_curve_inputs``), they share one read of the residuals instead of one each; ``layout``
    is ``metrics``' (``analysis.geometry.metrics.pair_metrics``), for the others to share its sums."""
    from analysis.readouts.factorial import FACTORIAL_PASSES, factorial_shares
    from analysis.report.summary import summary_inputs

    out = {"largest": _largest_lazy(ds, metrics, keep), "summary": summary_inputs(ds, keep, layout)}
    if set(FACTORIAL_PASSES) <= {str(p) for p in ds.pass_.values}:
        out["factorial"] = factorial_shares(ds, where=keep, layout=layout)
    return out


def _largest_lazy(ds: xr.Dataset, metrics: xr.Dataset, keep: xr.DataArray | None) -> xr.DataArray:
    from analysis.compute.reductions import position_mean

    # over real positions, a block of prompts' real tokens at a time (never the padded layout)
    return position_mean(metrics.rel_norm_diff, np.asarray(ds.n_tokens.values), keep)


def largest_change(ds: xr.Dataset, metrics: xr.Dataset | None, keep: xr.DataArray | None, top: int = 5,
                   by_layer: xr.DataArray | None = None) -> str:
    """The layers of largest mean relative change per pair; ``by_layer``: :func:`page_inputs`' ``largest``,
    computed (None: computed here, from ``metrics`` or, when None, the store's ``rel_norm_diff``)."""
    if by_layer is None:
        if metrics is None:
            from analysis.geometry.metrics import pair_metrics

            metrics = pair_metrics(ds, "norm", ["rel_norm_diff"])
        by_layer = _largest_lazy(ds, metrics, keep).compute()
    rows = []
    for pair in by_layer.pair.values:
        series = by_layer.sel(pair=pair).values
        if not np.nan_to_num(series).any():  # e.g. passes that differ only in identical input embeddings
            rows.append([str(pair), "no change at any layer (exactly 0)"])
            continue
        order = np.argsort(-np.nan_to_num(series, nan=-np.inf))[:3]
        rows.append([str(pair), ", ".join(f"{int(by_layer.layer.values[i])} ({series[i]:.3g})" for i in order)])
    return ("<h2>Where the change is largest</h2><p>Mean relative change ||h_right - h_left|| / ||h_left|| per "
            "layer over real positions; the three largest layers of each pair.</p>"
            + _table(["pair", "layers (mean rel_norm_diff)"], rows[:top * 2]))


def factorial_section(ds: xr.Dataset, keep: xr.DataArray | None, out: Path,
                      shares: xr.Dataset | None = None) -> tuple[str, Path | None]:
    """The factorial shares by layer, a table and a stacked plot; ``shares`` computed already, or None."""
    from analysis.readouts.factorial import FACTORIAL_PASSES, factorial_shares

    if not set(FACTORIAL_PASSES) <= {str(p) for p in ds.pass_.values}:
        return "", None
    import matplotlib.pyplot as plt

    from analysis.report.plots import _save

    shares = factorial_shares(ds, where=keep).compute() if shares is None else shares
    layers = shares.layer.values
    fig, ax = plt.subplots(figsize=(8, 3.5))
    shown = (("embedding_share", "embedding", "tab:blue"), ("body_share", "body", "tab:orange"),
             ("cross_share", "cross", "tab:gray"), ("interaction_ratio", "interaction / total", "black"))
    for name, label, color in shown:
        ax.plot(layers, shares[name].values, ".-", color=color, label=label)
        if f"{name}_low" in shares:
            ax.fill_between(layers, shares[f"{name}_low"].values, shares[f"{name}_high"].values, color=color,
                            alpha=0.2, linewidth=0)
    ax.set(title="factorial shares of sum |h_SS - h_BB|^2 by layer (bands: 95% bootstrap intervals over prompts)",
           xlabel="layer", ylabel="share")
    ax.title.set_fontsize(9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    image = _save(fig, out / "factorial_shares.png")
    rows = [[int(la), *(estimate_of(shares.sel(layer=la), name)
                        for name in ("embedding_share", "body_share", "interaction_ratio"))] for la in layers]
    return ("<h2>Embeddings or body?</h2><p>D = h_SS - h_BB = E + B: the embedding main effect E, the body main "
            "effect B and their interaction, as shares of sum |D|^2, each with its 95% bootstrap interval over "
            "prompts in parentheses (–: no change at that layer, so no shares).</p>"
            + _table(["layer", "embedding", "body", "interaction"], rows)), image


def diff_lens_section(ds: xr.Dataset, massive: xr.DataArray | None, top: int = 8) -> str:
    from analysis.geometry.metrics import store_pass_pairs
    from analysis.readouts.difflens import diff_lens
    from store.errors import ResdiffError

    pair = _pair(ds, store_pass_pairs(ds)[0])
    try:  # what the section shows only: one pair, the last four layers, the first window (a token chunk a prompt)
        result = diff_lens(ds, top=top, include_massive=massive is None, massive=massive, pairs=[pair],
                           layers=[int(la) for la in ds.layer.values[-4:]], windows=("first",))
    except ResdiffError as exc:
        return f"<h2>Difference lens</h2><p>not available: {html.escape(str(exc))}</p>"
    rows = []
    for layer in result.layer.values:
        cell = result.sel(pair=pair, layer=layer, window="first", side="right")
        if (cell.promoted_id.values < 0).all():  # an exactly zero mean difference has no tokens to show
            rows.append([int(layer), "no difference", "no difference"])
            continue
        rows.append([int(layer), " ".join(visible(t) for t in token_texts(ds, cell.promoted_id.values)),
                     " ".join(visible(t) for t in token_texts(ds, cell.suppressed_id.values))])
    return (f"<h2>Difference lens ({html.escape(pair)})</h2><p>The mean difference over the first "
            f"{result.attrs['k']} real positions, read through the right pass's normed lens "
            f"({html.escape(result.attrs['lens_source'])}).</p>" + _table(["layer", "promoted", "suppressed"], rows))


def _not_available(title: str, ds: xr.Dataset) -> str:
    """A section's note in place of a panel whose statistics are absent or unfinished."""
    from store.completeness import left_out, lens_note

    why = left_out(ds) or lens_note(ds) or "this store has no lens statistics"
    return f'<h2>{html.escape(title)}</h2><p class="note">Not shown: {html.escape(why)}</p>'


def kl_section(ds: xr.Dataset, keep: xr.DataArray | None, top: int = 8) -> str:
    if "kl" not in ds:
        return _not_available("Largest KL, norm lens", ds)
    from analysis.compute import lens_sums
    from analysis.compute.reductions import hotspots
    from analysis.geometry.shared_prefix import shared_positions, user_start

    pair = _pair(ds, [str(p) for p in ds.pair.values])
    kl = ds.kl.sel(lens="norm", pair=pair, drop=True)
    repeat, count = shared_positions(ds)  # template text shared by many prompts: one row, with its count
    once = xr.DataArray(~repeat, dims=("prompt", "token"))
    kept = once if keep is None else once & keep
    if lens_sums.applies(ds):  # read region by region: the variable has a chunk per few prompts and tokens
        found = lens_sums.largest(ds, pair, "kl", "norm", top, np.asarray(kept.values, bool))
    else:
        spots = hotspots(kl, top, kept).compute()  # masks applied per prompt block
        found = np.stack([spots.value.values, spots.prompt.values, spots.layer.values, spots.token.values], axis=1)
        found = found[found[:, 1] >= 0]
    ids, n_tokens, starts = np.asarray(ds.token_id.values), np.asarray(ds.n_tokens.values), user_start(ds)
    rows = []
    for value, row, layer, token in found:
        row, layer, token = int(row), int(layer), int(token)  # indices
        begin = max(0, token - 4) if token < starts[row] else max(int(starts[row]), token - 4)  # from the user's text
        context = token_texts(ds, ids[row, begin:min(int(n_tokens[row]), token + 2)])
        shared = int(count[row, token])
        label = str(int(ds.prompt.values[row])) + (f" (+{shared - 1} same prefix)" if shared > 1 else "")
        rows.append([label, int(ds.layer.values[layer]), token, "".join(context).replace("\n", "⏎"), float(value)])
    return (f"<h2>Largest KL({html.escape(pair)}), norm lens</h2>"
            + _table(["prompt", "layer", "token", "context", "KL [nats]"], rows))


def _prompt_row(ds: xr.Dataset, name: str, row: int) -> xr.DataArray:
    """``ds[name]`` at one store row (prompt), in memory: read straight from the store's files where it can (a
    selection through Dask builds a graph over every chunk of a statistics variable first, which took most
    of half a minute on a thousand ragged prompts; integer ids, which ``open_store`` gives no region reads,
    included: their graph took 17 s where the row's read takes 0.1)."""
    from analysis.compute import lens_sums
    from store.reader import direct_regions

    var = ds[name]
    source = direct_regions(var) or lens_sums.regions(ds, name)
    if source is None:
        return var.isel(prompt=row).compute()
    axis = var.dims.index("prompt")
    where = tuple(slice(row, row + 1) if d == "prompt" else slice(0, n) for d, n in zip(var.dims, var.shape,
                                                                                      strict=True))
    dims = [d for d in var.dims if d != "prompt"]
    coords = {d: var[d].values for d in dims if d in var.coords}
    return xr.DataArray(np.take(source.read(where), 0, axis=axis), dims=dims, coords=coords)


def token_view(ds: xr.Dataset, prompt: int, pair: str = "BB-SS", pass_: str = "SS") -> str:
    """Layers x tokens of one prompt: the ``pass_``'s top norm-lens token per cell, coloured by KL(``pair``).

    Columns start at the user's text (a chat template's leading text, such as a default system prompt, is
    the same in every conversation); the table scrolls in its own box with its headers kept in view."""
    if "topk_id" not in ds or "kl" not in ds:
        return _not_available(f"Token view: prompt {prompt}, pass {pass_}", ds)
    from analysis.geometry.shared_prefix import user_start

    pair = pair if pair in [str(p) for p in ds.pair.values] else str(ds.pair.values[0])
    row = [int(p) for p in ds.prompt.values].index(prompt)
    start = int(user_start(ds)[row])
    one = ds[["n_tokens", "token_id"]].sel(prompt=prompt)
    n = int(one.n_tokens)
    columns = slice(start, n)
    layers = np.flatnonzero(np.isin(ds.layer.values, lens_layers(ds)))  # rows: the layers with statistics
    top = _prompt_row(ds, "topk_id", row).sel(lens="norm", pass_=pass_).isel(k=0, token=columns,
                                                                          layer=layers).values  # (layer, token)
    kl = _prompt_row(ds, "kl", row).sel(lens="norm", pair=pair).isel(token=columns, layer=layers).values
    scale = np.nanpercentile(kl, 99) if np.isfinite(kl).any() else 1.0
    texts = token_texts(ds, one.token_id.values[columns])
    header = ('<tr><th class="corner">layer</th>' + "".join(f"<th>{html.escape(visible(t))}</th>" for t in texts)
              + "</tr>")
    body = []
    for li in range(top.shape[0] - 1, -1, -1):
        words = token_texts(ds, top[li])
        cells = []
        for t in range(len(texts)):
            heat = float(np.clip(np.nan_to_num(kl[li, t]) / max(scale, 1e-12), 0, 1))
            color = f"rgba(220, 60, 40, {heat:.2f})"
            cells.append(f'<td style="background:{color}" title="KL {kl[li, t]:.3g}">'
                         f"{html.escape(visible(words[t]))}</td>")
        body.append(f"<tr><th>{int(ds.layer.values[layers[li]])}</th>{''.join(cells)}</tr>")
    skipped = (f" The first {start} positions, the chat template's own text before the user's, are not shown."
               if start else "")
    return (f'<h2>Token view: prompt {prompt}, pass {pass_}</h2><p>Each cell is the top token of the {pass_} pass '
            f"under the norm lens at that layer and position; red is KL({html.escape(pair)}), norm lens (99th "
            f"percentile = full red).{skipped}</p>"
            f'<div class="scroll"><table class="tokens" id="token-view">{header}{"".join(body)}</table></div>')


def opening(ds: xr.Dataset, metrics: xr.Dataset | None, out: Path, prompt: int, found: xr.Dataset,
            include_massive: bool = False, computed: dict | None = None) -> tuple[list[str], list[Path]]:
    """The sections that open the report, and the images they made; ``found`` is
    ``analysis.geometry.outliers.massive_positions(ds)``, computed; ``computed``: :func:`page_inputs` computed with the
    same massive positions left out (None: each section computes its own)."""
    from analysis.geometry.outliers import describe_massive

    keep = None if include_massive or not bool(found.massive.any()) else ~found.massive
    computed = computed or {}
    sections = ["<h2>Massive activations</h2><p>" + "<br>".join(html.escape(line) for line in
                                                                  describe_massive(ds, found, include_massive))
                + "</p>"]
    sections.append(largest_change(ds, metrics, keep, by_layer=computed.get("largest")))
    factorial_html, image = factorial_section(ds, keep, out, computed.get("factorial"))
    sections.append(factorial_html)
    sections.append(diff_lens_section(ds, None if include_massive else found.massive))
    sections.append(kl_section(ds, keep))
    sections.append(token_view(ds, prompt))
    return [s for s in sections if s], [image] if image else []
