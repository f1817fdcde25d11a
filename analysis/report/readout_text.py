"""The text of the readout commands (``factorial``, ``diff-lens``, ``loader-stats``), from computed results.

Each function takes what its analysis returned, computed, and gives the lines the command prints;
a quantity that was not computed (a layer without change) is a dash and a line that says why, never
a number.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.readouts.tokens import token_texts
from analysis.report.tables import estimate_of, table

FACTORIAL_COLUMNS = ["embedding_share", "body_share", "cross_share", "interaction_ratio"]


def factorial_lines(shares: xr.Dataset, by: str | None = None) -> list[str]:
    """The factorial's shares per layer (per group of ``by``), from :func:`analysis.factorial_shares`, computed;
    each share with its 95% bootstrap interval where the shares carry one."""
    lines = ["Factorial attribution of D = h_SS - h_BB = E (embeddings) + B (body), per layer over real positions: "
             "shares of sum |D|^2 (embedding + body + cross = 1), interaction = sum |I|^2 / sum |D|^2"
             + _resampled(shares)]
    groups = [None] if by is None else [str(g) for g in shares[by].values]
    for group in groups:
        part = shares if group is None else shares.sel({by: group})
        if group is not None:
            lines.append(f"\n{by} = {group}:")
        rows = [[int(layer), *(estimate_of(part.sel(layer=layer), c) if float(part.total_sq.sel(layer=layer)) > 0
                               else "-" for c in FACTORIAL_COLUMNS),
                 float(np.sqrt(part.total_sq.sel(layer=layer)))] for layer in part.layer.values]
        if any("-" in row for row in rows):  # shares of nothing are not numbers
            lines.append("(-: no change at this layer, sum |D|^2 = 0, so no shares)")
        lines.append(table(["layer", "embedding", "body", "cross", "interaction", "sqrt sum |D|^2"], rows))
    return lines


def _resampled(result: xr.Dataset) -> str:
    """What the intervals of a readout are, for its heading; empty without intervals."""
    if "resamples" not in result.attrs:
        return ""
    return (f"; (low..high): 95% bootstrap interval over prompts, {result.attrs['resamples']} resamples, seed "
            f"{result.attrs['seed']}; (–): no interval (too few prompts contribute)")


def diff_lens_lines(ds: xr.Dataset, result: xr.Dataset, k: int, include_massive: bool) -> list[str]:
    """Promoted and suppressed tokens of each pair, layer and window, from :func:`analysis.diff_lens`."""
    lines = [f"Mean difference h_right - h_left, read through each side's normed lens ({result.attrs['lens_source']}); "
             f"windows: the first {k} real positions of each prompt, and all real positions"
             + ("" if include_massive else "; massive-activation positions left out")]
    texts = {}
    for kind in ("promoted", "suppressed"):  # decoded once, all cells together
        ids = result[f"{kind}_id"].values
        texts[kind] = np.array(token_texts(ds, ids.ravel()), dtype=object).reshape(ids.shape)
    for q, pair in enumerate(str(p) for p in result.pair.values):
        for la, layer in enumerate(int(la) for la in result.layer.values):
            for w, window in enumerate(result.window.values):
                if (result.promoted_id.values[q, la, w] < 0).all():
                    lines.append(f"{pair} layer {layer} {window}: no difference (the mean of h_right - h_left is "
                                 "exactly 0, or the window holds no position)")
                    continue
                for s, side in enumerate(("left", "right")):
                    up = ", ".join(repr(t) for t in texts["promoted"][q, la, w, s])
                    down = ", ".join(repr(t) for t in texts["suppressed"][q, la, w, s])
                    lines.append(f"{pair} layer {layer} {window} ({side} lens): promoted {up}; suppressed {down}")
    return lines


def loader_stats_lines(store: str, stats: dict, pair: str | None, batch_size: int, world_size: int) -> list[str]:
    """What an activation loader will do, from :func:`analysis.loader.stats.loader_stats`."""
    layout = "differences " + pair if pair else "passes " + ",".join(stats["passes"])
    lines = [f"{store}: {stats['rows']} rows ({layout}, batch shape (batch, "
             f"{', '.join(map(str, stats['row_shape']))})) in {stats['units']} units of up to {stats['unit_read']} "
             f"read each; {stats['excluded_massive']} massive-activation positions left out",
             f"per epoch and rank (world size {world_size}): {stats['batches_per_epoch']} batches of "
             f"{batch_size}; shuffle buffer {stats['shuffle_buffer']} ({stats['shuffle_buffer_rows']} rows)"]
    if stats["expected_rows_per_s"] is not None:
        lines.append(f"expected read throughput: {stats['expected_rows_per_s']} rows/s ({stats['expected_read_MBps']} "
                     f"MB/s of chunks), about {stats['expected_epoch_s']} s per epoch on one process")
    if stats["scales"] is not None:
        lines.append(f"normalisation factors (layer x pass): {stats['scales']}")
    return lines


def crossing_lines(profile) -> list[str]:
    """The ``crossing`` command's tables: per split and direction, the shares left and their 95% intervals; the
    interactions at each split."""
    has_kl = "kl" in profile
    head = ["split", "direction", *(["KL", "KL share"] if has_kl else []), "resid share"]
    rows = []
    for split in profile.split.values:
        for direction in profile.direction.values:
            at = profile.sel(split=split, direction=direction)
            kl = [estimate_of(at, "kl"), estimate_of(at, "kl_share")] if has_kl else []
            rows.append([int(split), f"{direction}@L", *kl, estimate_of(at, "resid_share")])
    lines = ["crossed passes at the last layer (share = what the crossing leaves of the SS - BB change; 1 - share "
             "is recovered" + _resampled(profile) + "):", table(head, rows)]
    if not has_kl:
        lines.append("KL: not in this store (captured with --no-lens, or without the pairs B>S@L-SS, S>B@L-BB, BB-SS)")
    inter_head, kl_inter = ["split", "resid interaction share"], "kl_interaction" in profile
    if kl_inter:
        inter_head += ["KL interaction", "KL interaction share"]
    lines.append("interaction of lower x upper body at each split, last layer: sum |SS - B>S@L - S>B@L + BB|^2 as a "
                 "share of sum |h_SS - h_BB|^2" + (", and KL(SS || BB) - KL(B>S@L || BB) - KL(S>B@L || BB) (per "
                                                  "position, and as a share of KL(SS || BB))" if kl_inter else "")
                 + ":")
    names = ["interaction_share", *(["kl_interaction", "kl_interaction_share"] if kl_inter else [])]
    lines.append(table(inter_head, [[int(s), *(estimate_of(profile.sel(split=s), n) for n in names)]
                                    for s in profile.split.values]))
    if has_kl and not kl_inter:
        lines.append("KL interaction: not in this store (it needs the pairs BB-B>S@L and BB-S>B@L, which capture "
                     "compares by default since December 2026; capture again, or name them with --pass-pair)")
    if "tracked_interaction" in profile:
        tracked = profile.tracked_interaction
        names = [str(t) for t in (profile.tracked_str if "tracked_str" in profile.coords else tracked.tracked).values]
        lines.append("interaction in the tracked tokens' logits (norm lens, last layer; mean over positions):")
        lines.append(table(["split", *names], [[int(s), *(estimate_of(profile.sel(split=s).isel(tracked=i),
                                                                      "tracked_interaction")
                                                          for i in range(len(names)))]
                                                for s in profile.split.values]))
    return lines
