"""The text of the readout commands (``factorial``, ``diff-lens``, ``loader-stats``), from computed results.

Each function takes what its analysis returned, computed, and gives the lines the command prints;
a quantity that was not computed (a layer without change) is a dash and a line that says why, never
a number.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.readouts.tokens import token_texts
from analysis.report.tables import table

FACTORIAL_COLUMNS = ["embedding_share", "body_share", "cross_share", "interaction_ratio"]


def factorial_lines(shares: xr.Dataset, by: str | None = None) -> list[str]:
    """The factorial's shares per layer (per group of ``by``), from :func:`analysis.factorial_shares`, computed."""
    lines = ["Factorial attribution of D = h_SS - h_BB = E (embeddings) + B (body), per layer over real positions: "
             "shares of sum |D|^2 (embedding + body + cross = 1), interaction = sum |I|^2 / sum |D|^2"]
    groups = [None] if by is None else [str(g) for g in shares[by].values]
    for group in groups:
        part = shares if group is None else shares.sel({by: group})
        if group is not None:
            lines.append(f"\n{by} = {group}:")
        rows = [[int(layer), *(float(part[c].sel(layer=layer)) if float(part.total_sq.sel(layer=layer)) > 0
                               else "-" for c in FACTORIAL_COLUMNS),
                 float(np.sqrt(part.total_sq.sel(layer=layer)))] for layer in part.layer.values]
        if any("-" in row for row in rows):  # shares of nothing are not numbers
            lines.append("(-: no change at this layer, sum |D|^2 = 0, so no shares)")
        lines.append(table(["layer", "embedding", "body", "cross", "interaction", "sqrt sum |D|^2"], rows))
    return lines


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
    """The ``crossing`` command's table: per split and direction, the shares left and their 95% intervals."""
    def cell(value) -> str:
        value = float(value)
        return f"{value:.4f}" if value == value else "–"

    has_kl = "kl" in profile
    head = ["split", "direction", *(["KL", "KL share", "95% interval"] if has_kl else []), "resid share",
            "95% interval"]
    rows = []
    for split in profile.split.values:
        for direction in profile.direction.values:
            at = profile.sel(split=split, direction=direction)
            interval = f"{cell(at.kl_share_low)}..{cell(at.kl_share_high)}" if has_kl else ""
            kl = [cell(at.kl), cell(at.kl_share), interval] if has_kl else []
            rows.append([int(split), f"{direction}@L", *kl, cell(at.resid_share),
                         f"{cell(at.resid_share_low)}..{cell(at.resid_share_high)}"])
    lines = [f"crossed passes at the last layer (share = what the crossing leaves of the SS - BB change; 1 - share "
             f"is recovered; {profile.attrs.get('resamples')} bootstrap resamples of the prompts, seed "
             f"{profile.attrs.get('seed')}):", table(head, rows)]
    if not has_kl:
        lines.append("KL: not in this store (captured with --no-lens, or without the pairs B>S@L-SS, S>B@L-BB, BB-SS)")
    lines.append("interaction of lower x upper body at each split (SS - B>S@L - S>B@L + BB, last layer; share of "
                 "sum |h_SS - h_BB|^2):")
    lines.append(table(["split", "interaction share", "95% interval"], [
        [int(s), cell(profile.interaction_share.sel(split=s)),
         f"{cell(profile.interaction_share_low.sel(split=s))}..{cell(profile.interaction_share_high.sel(split=s))}"]
        for s in profile.split.values]))
    if "tracked_interaction" in profile:
        tracked = profile.tracked_interaction
        names = [str(t) for t in (profile.tracked_str if "tracked_str" in profile.coords else tracked.tracked).values]
        lines.append("interaction in the tracked tokens' logits (norm lens, last layer; mean over positions, 95% "
                     "interval):")
        low, high = profile.tracked_interaction_low, profile.tracked_interaction_high

        def with_interval(split, i: int) -> str:
            at = {"split": split}
            return f"{cell(tracked.sel(at).isel(tracked=i))} ({cell(low.sel(at).isel(tracked=i))}.." \
                   f"{cell(high.sel(at).isel(tracked=i))})"

        lines.append(table(["split", *names], [[int(s), *(with_interval(s, i) for i in range(len(names)))]
                                                for s in profile.split.values]))
    return lines
