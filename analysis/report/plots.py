"""Pictures of a store: layer curves of the six pairs, layer x token heatmaps, spectra, CP factors,
and a self-contained HTML page that embeds them.

Every figure says what it shows in its title and axis labels, with units where there
are any; pair metrics are right relative to left (``||h_right - h_left||``, KL(right || left)).
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from pathlib import Path

import dask
import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.ticker import MaxNLocator

from analysis.geometry.metrics import LENS_METRICS, PAIR_METRICS, layout_for, pair_metrics, pass_metrics
from analysis.readouts.tokens import token_text_table, visible
from store.atomic import atomic_output

CURVES = (("norm_diff", "||h_right - h_left||"), ("cosine_sim", "cos(h_left, h_right)"),
          ("kl", "KL(right || left) [nats]"))


def _layer_ticks(layers: np.ndarray, most: int = 12) -> list[int]:
    """Row indices to label on a layer axis: at most ``most``, evenly spaced, the last included."""
    step = max(1, -(-len(layers) // most))
    return sorted({*range(0, len(layers), step), len(layers) - 1})


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    with atomic_output(path, suffix=".partial.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def layer_curve_inputs(ds: xr.Dataset, lens: str = "norm") -> dict:
    """The lazy per-layer means :func:`layer_curves` draws, each a Dataset of ``mean``, ``mean_low`` and
    ``mean_high`` (its 95% bootstrap interval over prompts) by (pair, layer); compute them with other numbers of
    the store to share its reads."""
    from analysis.compute import lens_sums
    from analysis.compute.bootstrap import with_intervals
    from analysis.compute.reductions import prompt_moments

    streamed = "kl" in ds and lens_sums.applies(ds)
    # geometric curves from the residuals; KL read region by region where it can (an expression over the
    # statistics variable is a task per chunk: hundreds of thousands on a large ragged store)
    geometric = [m for m, _ in CURVES if m != "kl"]
    # over the real positions only where the store allows (the same numbers as the padded layout, less work)
    layout = layout_for(ds, geometric)
    metrics = dict(pair_metrics(ds, lens, geometric, layout).data_vars)
    if "kl" in ds and not streamed:  # (a padded layout of its own: a dict, not one Dataset)
        metrics["kl"] = pair_metrics(ds, lens, ["kl"]).kl
    n_tokens = np.asarray(ds.n_tokens.values)  # sums over real positions: a block's padding is never touched
    sums = {}
    for m, _ in CURVES:
        if m in metrics:
            moments = prompt_moments(metrics[m], n_tokens, full=False)
            sums[m] = (moments.sel(moment="sum", drop=True), moments.sel(moment="count", drop=True))
    if streamed:
        per_prompt = lens_sums.layer_sums(ds, "kl", lens)
        sums["kl"] = (per_prompt["sum"], per_prompt["count"])
    lazy = {}
    for m, (total, count) in sums.items():
        n = count.sum("prompt")
        mean = xr.Dataset({"mean": total.sum("prompt") / n.where(n > 0)})
        lazy[m] = with_intervals(mean, {"mean": (total, count)})
    return lazy


def layer_curves(ds: xr.Dataset, out: Path, lens: str = "norm", means: dict | None = None) -> Path:
    """Mean over real positions of norm_diff, cosine_sim and KL per layer, all pairs on each panel, each with its
    95% bootstrap interval over prompts as a band; ``means``: :func:`layer_curve_inputs` computed (None:
    computed here)."""
    if means is None:
        with warnings.catch_warnings():  # layers without statistics (--lens-layers) have no mean: not drawn
            warnings.filterwarnings("ignore", "Mean of empty", RuntimeWarning)
            (means,) = dask.compute(layer_curve_inputs(ds, lens))
    present = [(m, label) for m, label in CURVES if m in means]
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
    from analysis.readouts.crossing import crossed_pairs

    hidden = crossed_pairs(ds)  # drawn by the crossing profile; dozens of lines here would hide the four passes
    for ax, (metric, label) in zip(axes[0], present, strict=True):
        curve = means[metric]
        for pair in (q for q in curve.pair.values if str(q) not in hidden):
            at = curve.sel(pair=pair)
            layers, mean = curve.layer.values, at["mean"].values
            if len(layers) > 1:
                (line,) = ax.plot(layers, mean, marker="o", ms=3, label=pair)
                ax.fill_between(layers, at.mean_low.values, at.mean_high.values, color=line.get_color(), alpha=0.2,
                                linewidth=0)
            else:  # one layer with statistics (--lens-layers): a point and its interval
                err = np.abs(np.stack([mean - at.mean_low.values, at.mean_high.values - mean]))
                ax.errorbar(layers, mean, yerr=np.nan_to_num(err), fmt="o", ms=4, capsize=3, label=pair)
        lens_label = f", {lens} lens" if metric in LENS_METRICS else ""
        ax.set(title=f"{metric} by layer (mean over prompts and tokens{lens_label};\nbands: 95% bootstrap "
               "intervals over prompts)", xlabel="layer (0 = embeddings)", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="pair (left-right)", fontsize=8)
    return _save(fig, out / "layer_curves.png")


RESPONSE_CURVES = (("kl", "KL(right || left) [nats]"), ("logprob_diff", "log p_right - log p_left [nats]"),
                   ("shift_rate", "shift rate (right top-1 not in left top-3)"))


def response_curves(curve: xr.Dataset, out: Path) -> Path:
    """The shallow-alignment curve: each pair's mean KL, log-prob difference of the written token and shift rate
    by response position (``curve``: :func:`analysis.readouts.divergence.response_curve`, computed)."""
    present = [(m, label) for m, label in RESPONSE_CURVES if m in curve]
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 4), squeeze=False)
    # a mean over a handful of long responses is noise: positions that few prompts reach are not drawn
    fewest = max(3, int(np.ceil(0.05 * int(curve.n.max()))))
    shown = curve.where(curve.n >= fewest)
    positions = curve.response.values
    for ax, (metric, label) in zip(axes[0], present, strict=True):
        for pair in curve.pair.values:
            at = shown.sel(pair=pair)
            (line,) = ax.plot(positions, at[metric].values, marker="o", ms=3, label=pair)
            if f"{metric}_low" in at:
                ax.fill_between(positions, at[f"{metric}_low"].values, at[f"{metric}_high"].values,
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set(title=f"{metric} by response position\n(mean over prompts, 95% bands; positions reached by >= "
               f"{fewest})",
               xlabel="response token (0 = first)", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].legend(title="pair (left-right)", fontsize=8)
    return _save(fig, out / "response_curves.png")


def crossing_plot(profile: xr.Dataset, out: Path) -> Path:
    """The depth profile of the crossed passes: per split, the share of the SS - BB change each direction
    leaves (residuals at the last layer, and KL at the output where the store has it), and the interaction of
    lower x upper body at each split, with 95% bootstrap intervals (``profile``:
    :func:`analysis.readouts.crossing.crossing_profile`, computed)."""
    shares = [(name, label) for name, label in (("resid_share", "share of sum |h_SS - h_BB|^2 left"),
                                                 ("kl_share", "share of KL(SS || BB) left")) if name in profile]
    interactions = [(name, label) for name, label in (("interaction_share", "residuals"),
                                                       ("kl_interaction_share", "KL")) if name in profile]
    panels = len(shares) + 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    splits = profile.split.values

    def draw(ax, at: xr.Dataset, name: str, style: str, label: str) -> None:
        value = at[name].values
        err = np.abs(np.stack([value - at[f"{name}_low"].values, at[f"{name}_high"].values - value]))
        ax.errorbar(splits, value, yerr=np.nan_to_num(err), fmt=style, ms=4, capsize=3, label=label)

    for ax, (name, label) in zip(axes[0], shares, strict=False):
        for direction, style in zip(profile.direction.values, ("o-", "s--"), strict=False):
            draw(ax, profile.sel(direction=direction), name, style, f"{direction}@L")
        ax.set(title=f"{name} by split layer L", xlabel="split layer L (blocks below L from the first model)",
               ylabel=label)
        ax.legend(title="crossed pass", fontsize=8)
    ax = axes[0][-1]
    for (name, label), style in zip(interactions, ("o-", "s--"), strict=False):
        draw(ax, profile, name, style, label)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(title="interaction of lower x upper body at L", xlabel="split layer L",
           ylabel="share of the SS - BB change")
    ax.legend(title="measured on", fontsize=8)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle("crossed passes at the last layer (error bars: 95% bootstrap intervals over prompts)", fontsize=10)
    return _save(fig, out / "crossing_profile.png")


def heatmaps(ds: xr.Dataset, out: Path, metric: str = "norm_diff", prompt: int = 0, lens: str = "norm",
             massive: np.ndarray | None = None) -> Path:
    """Layer x token heatmaps of one prompt: a pair metric per pair, or a pass metric per pass.

    ``massive`` (this prompt's tokens) marks massive-activation positions: drawn, but left
    out of the colour scale, which is each panel's own 1-99% range of the other cells.
    """
    from store.completeness import without_lens

    if metric not in LENS_METRICS:  # no graph over the statistics variables
        ds = without_lens(ds)
    # the metric only (a graph of every metric took a second to build); its run of prompt chunks only is read
    # (a selection of the prompt first would go through the Dask graph of the store's chunks, which at times
    # took ten seconds to cull)
    table = pair_metrics(ds, lens, [metric]) if metric in PAIR_METRICS else xr.Dataset()
    if metric not in table:
        table = pass_metrics(ds)
    lead = "pair" if "pair" in table[metric].dims else "pass_"
    n_real = int(ds.n_tokens.sel(prompt=prompt))
    grid = table[metric].sel(prompt=prompt).isel(token=slice(0, n_real)).compute()
    tokens = [visible(t) for t in token_text_table(ds, prompt)[:n_real]]  # decoded text, not raw pieces
    labels = [str(x) for x in grid[lead].values]
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        panel = grid.sel({lead: label}).values
        # Per-panel robust scale: one sink position (a massive activation) must not wash out the rest.
        scaled = panel if massive is None else panel[:, ~np.asarray(massive[:n_real], dtype=bool)]
        finite = scaled[np.isfinite(scaled)]
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        image = ax.imshow(panel, aspect="auto", origin="lower", vmin=vmin, vmax=max(vmax, vmin + 1e-12),
                          cmap="viridis")
        lens_label = f", {lens} lens" if metric in LENS_METRICS else ""
        ax.set(title=f"{metric}{lens_label}, {'pair' if lead == 'pair' else 'pass'} {label} (1-99% colour scale)",
               xlabel="token", ylabel="layer")
        layer_ticks = _layer_ticks(grid.layer.values)  # rows are stored layers: label them with their numbers
        ax.set_yticks(layer_ticks, [str(int(grid.layer.values[i])) for i in layer_ticks])
        step = max(1, n_real // 12)
        ax.set_xticks(range(0, n_real, step), tokens[::step], rotation=60, fontsize=7)
        fig.colorbar(image, ax=ax)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"prompt {prompt}: {str(ds.prompt_text.sel(prompt=prompt).values)[:80]!r}", fontsize=9)
    return _save(fig, out / f"heatmap_{metric}_prompt{prompt}.png")


def spectra_plots(result: xr.Dataset, out: Path) -> list[Path]:
    """Normalised spectra per layer (one panel per pair) and effective ranks per layer."""
    pairs = [str(p) for p in result.pair.values]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    labels = [int(la) for la in result.layer.values]  # true layer numbers (a --layers store keeps a subset)
    low, high = min(labels), max(max(labels), min(labels) + 1)
    for ax, pair in zip(axes.flat, pairs, strict=False):
        for layer, label in enumerate(labels):
            s = result.singular_value.sel(pair=pair).isel(layer=layer).values
            if np.nansum(s) > 0:
                share = s**2 / np.nansum(s**2)
                ax.semilogy(np.arange(1, len(s) + 1), np.maximum(share, 1e-12),
                            color=cmap((label - low) / (high - low)))
        ax.set(title=f"spectrum of {pair} differences", xlabel="component", ylabel="share of variance")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(low, high)), ax=axes, label="layer")
    spectra_png = _save(fig, out / "spectra.png", tight=False)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for pair in pairs:
        axes[0].plot(result.layer.values, result.participation_ratio.sel(pair=pair).values, marker="o", ms=3,
                     label=pair)
        axes[1].plot(result.layer.values, result.rank90.sel(pair=pair).values, marker="o", ms=3, label=pair)
    axes[0].set(title="participation ratio by layer", xlabel="layer", ylabel="(sum s^2)^2 / sum s^4")
    axes[1].set(title="components reaching 90% of variance", xlabel="layer", ylabel="rank90")
    axes[0].legend(title="pair", fontsize=8)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return [spectra_png, _save(fig, out / "effective_rank.png")]


def cp_plot(result: xr.Dataset, out: Path) -> Path:
    """CP factors of the pair x layer x dim tensor of mean differences."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ranks = result.sizes["cp_rank"]
    for r in range(ranks):
        axes[0].bar(np.arange(result.sizes["pair"]) + r / (ranks + 1), result.cp_pair.isel(cp_rank=r).values,
                    width=1 / (ranks + 1), label=f"component {r} (weight {float(result.cp_weight[r]):.3g})")
        axes[1].plot(result.layer.values, result.cp_layer.isel(cp_rank=r).values, marker="o", ms=3)
        axes[2].plot(result.dim.values, result.cp_dim.isel(cp_rank=r).values, lw=0.8)
    axes[0].set_xticks(range(result.sizes["pair"]), [str(p) for p in result.pair.values], rotation=30)
    axes[0].set(title="CP factor over pairs", ylabel="loading (unit-norm factor)")
    axes[0].legend(fontsize=7)
    axes[1].set(title="CP factor over layers", xlabel="layer", ylabel="loading")
    axes[2].set(title="CP factor over hidden dimensions", xlabel="dim", ylabel="loading")
    fig.suptitle(f"CP of mean differences, rank {ranks}, relative error {result.attrs['cp_relative_error']:.2e}")
    return _save(fig, out / "cp_factors.png")


def html_report(images: list[Path], out: Path, title: str, summary_rows: list[list], settings: dict,
                opening: list[str] | None = None, opening_images: list[Path] | None = None) -> Path:
    """One self-contained HTML file: what changed first (``opening``, HTML sections with their images), then the
    figures embedded as data URIs, a summary table and the settings."""
    figures = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in images)
    first_images = "\n".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"><figcaption>{html.escape(p.stem)}</figcaption></figure>'
        for p in opening_images or [])
    head, *body = summary_rows
    table = ("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
             + "</table>")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
pre{{background:#f4f4f4;padding:1em;overflow:auto}}
table.tokens td{{text-align:center;font-family:monospace;font-size:11px;white-space:pre;padding:1px 3px}}
div.scroll{{max-width:100%;max-height:80vh;overflow:auto;border:1px solid #ccc}}
table.tokens th{{position:sticky;top:0;background:#fff;font-family:monospace;font-size:11px}}
table.tokens tr th:first-child{{position:sticky;left:0;background:#fff}} table.tokens th.corner{{z-index:2}}
p.note{{background:#fff4d6;padding:.5em}}</style></head>
<body><h1>{html.escape(title)}</h1>
{"".join(opening or [])}{first_images}
<h2>Summary</h2>{table}
<h2>Figures</h2>{figures}
<h2>Capture settings</h2><pre>{html.escape(json.dumps(settings, indent=2, default=str))}</pre>
<script>window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-rendered", ok + "/" + imgs.length);
}});</script>
</body></html>
"""
    path = out / "report.html"
    with atomic_output(path) as tmp:
        tmp.write_text(page)
    return path
