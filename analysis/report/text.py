"""The text report of ``cli.py report``: per-layer (or per-token) summaries, seven-number
summaries across prompts, hotspots, tracked-token changes and token-id previews, per pair (or
per pass), as aligned tables, with the rows an export writes.

All metrics' tables are computed in one ``dask.compute``, so each residual chunk is read
once per report.
"""

from __future__ import annotations

import warnings

import dask
import numpy as np
import xarray as xr

from analysis.compute.reductions import hotspots, seven_number_summary
from analysis.geometry.metrics import (
    LENS_METRICS,
    PAIR_METRICS,
    PASS_METRICS,
    layout_for,
    pair_metrics,
    pass_metrics,
    summarize_over,
)
from analysis.geometry.shared_prefix import shared_positions
from analysis.readouts.tokens import token_text_table, visible
from analysis.readouts.tracked import tracked_changes, tracked_trajectory
from analysis.report import responses_text
from analysis.report.summary import summary_inputs, summary_sentences
from analysis.report.tables import estimate, table
from store.completeness import left_out
from store.errors import MissingData, UsageError
from store.schema import lens_layers

RUN_METRICS = (*PASS_METRICS, "entropy", "target_logprob")
LOGIT_SOURCES = ("left", "right", "diff")
CHANGE_THRESHOLD = 0.5  # |right - left| of a tracked logit that counts as a change, as the legacy report


def check_prompt(ds: xr.Dataset, prompt: int) -> None:
    """A one-line error for a ``--prompt-index`` the store does not have (prompts are named 0..P-1 in source order)."""
    if prompt not in set(int(p) for p in ds.prompt.values):
        raise UsageError(f"--prompt-index {prompt} is out of range; the store has prompts 0..{ds.sizes['prompt'] - 1}")


def _metrics(ds: xr.Dataset, record_type: str, lens: str, names: list[str], layout: str) -> xr.Dataset:
    if record_type == "pairwise":
        return pair_metrics(ds, lens, names, layout)
    if layout == "positions":
        return pass_metrics(ds, layout)
    out = pass_metrics(ds)
    for name in ("entropy", "target_logprob"):
        if name in ds:
            out[name] = ds[name].sel(lens=lens, drop=True)
    return out


def _choose(ds: xr.Dataset, record_type: str, metrics: list[str] | None, lens: str,
            labels: list[str] | None, layout: str = "padded") -> tuple[xr.Dataset, list[str], str, list[str]]:
    if record_type not in ("pairwise", "runs"):
        raise UsageError(f"--record-type must be pairwise or runs, got {record_type!r}")
    known = PAIR_METRICS if record_type == "pairwise" else RUN_METRICS
    metrics = metrics or (["norm_diff"] if record_type == "pairwise" else ["norm"])
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise UsageError(f"unknown {record_type} metric {unknown[0]!r}; known: {', '.join(known)}")
    lead = "pair" if record_type == "pairwise" else "pass_"
    values = _metrics(ds, record_type, lens, metrics, layout)
    missing = [m for m in metrics if m not in values]
    if missing:
        why = left_out(ds) or "it needs residuals or lens statistics, which this store does not have"
        if "entropy" in ds and "target_logprob" not in ds and ("logprob" in missing[0]):
            why = ("this store has no target_logprob (its lens statistics were computed before resdiff recorded "
                   "it); capture again with --overwrite to have it")
        raise MissingData(what=f"data for metric {missing[0]!r}", fix=why)
    have = [str(x) for x in values[lead].values]
    chosen = labels or have
    bad = [x for x in chosen if x not in have]
    if bad:
        raise UsageError(f"unknown {'pair' if lead == 'pair' else 'pass'} {bad[0]!r}; the store has {', '.join(have)}")
    return values.sel({lead: chosen})[metrics], chosen, lead, metrics


def _metric_sections(ds, values, metrics, chosen, lead, axis, top_n, lens, extra=None, keep=None):
    repeat_pt, count_pt = shared_positions(ds)
    once = xr.DataArray(~repeat_pt, dims=("prompt", "token"))  # a position shared by many prompts, listed once
    with_lens = lens_layers(ds)  # lens metrics exist at these layers only (all, unless --lens-layers chose)
    pick = {m: values[m].sel(layer=with_lens) if m in LENS_METRICS else values[m] for m in metrics}
    # Each table reads the real positions only (what ``keep`` keeps: the massive ones are left out by default).
    n_tokens = np.asarray(ds.n_tokens.values)
    spots_at = once if keep is None else once & keep
    lazy = {m: (summarize_over(pick[m], axis, n_tokens, keep, intervals=True), hotspots(pick[m], top_n, spots_at),
                seven_number_summary(pick[m], n_tokens, keep)) for m in metrics}
    lazy["extra"] = extra
    with warnings.catch_warnings():
        # an all-padding row (e.g. cosine_prev at layer 0) has no mean: NaN is the answer, not a problem
        warnings.filterwarnings("ignore", "(invalid value|Mean of empty|All-NaN|Degrees of freedom)",
                                RuntimeWarning)
        (computed,) = dask.compute(lazy)
    extra = computed.pop("extra")
    tokens = token_text_table(ds)  # decoded text, not raw tokenizer pieces
    labels = ds.prompt.values
    word = "pair" if lead == "pair" else "pass"
    lines, rows, summary_rows = [], [], []
    for metric in metrics:
        summary, spots, seven = computed[metric]
        lens_label = f", {lens} lens" if metric in LENS_METRICS else ""
        for group, meaning in same_tables(ds, summary, spots, lead, chosen):
            if meaning.startswith("zero"):
                lines.append(f"\n{metric} ({word}s {', '.join(group)}{lens_label}): exactly 0 at every {axis}: "
                             + meaning.removeprefix("zero: "))
                continue
            s = summary.sel({lead: group[0]})
            named = f"{word} {group[0]}" if len(group) == 1 else f"{word}s {', '.join(group)}: {meaning}"
            lines.append(f"\n{metric} by {axis} ({named}{lens_label}):")
            lines.append(table([axis, "mean (95% interval over prompts)", "std", "min", "max"],
                               [[int(i), estimate(s["mean"][j], s["mean_low"][j], s["mean_high"][j]),
                                 *(float(s[k][j]) for k in ("std", "min", "max"))]
                                for j, i in enumerate(s[axis].values)]))
            column = "token_idx" if axis == "token" else axis  # "token" is a hotspot row's text
            summary_rows += [{"type": "summary", "metric": metric, lead: label, column: int(i),
                              **{k: float(s[k][j]) for k in ("mean", "mean_low", "mean_high", "std", "min", "max")}}
                             for label in group for j, i in enumerate(s[axis].values)]
            for label in group:
                h = spots.sel({lead: label})
                # hotspots gives store rows; reports name prompts by their label (source position)
                rows += [{"type": "hotspot", "metric": metric, lead: label, "rank": r + 1,
                          "prompt": int(labels[int(h.prompt.values[r])]),
                          "layer": int(pick[metric].layer.values[int(h.layer.values[r])]),
                          "token_idx": int(h.token.values[r]),
                          "token": str(tokens[int(h.prompt.values[r]), int(h.token.values[r])]),
                          "value": float(h.value.values[r]),
                          "prompts_sharing": int(count_pt[int(h.prompt.values[r]), int(h.token.values[r])])}
                         for r in range(h.sizes["rank"]) if int(h.prompt.values[r]) >= 0]
            shown = [r for r in rows if r["metric"] == metric and r[lead] == group[0]]
            lines.append(f"top {top_n} |{metric}| hotspots:")
            lines.append(table(["rank", "prompt", "layer", "token_idx", "token", "value"],
                               [[r["rank"], _prompt_cell(r), r["layer"], r["token_idx"], visible(r["token"]),
                                 r["value"]] for r in shown]))
        names = list(seven.data_vars)
        lines.append(f"\n{metric} across prompts (each prompt's mean over layers and tokens):")
        lines.append(table([word, *names], [[label, *(float(seven[n].sel({lead: label})) for n in names)]
                                            for label in chosen]))
    return lines, rows + summary_rows, extra


def _prompt_cell(row: dict) -> str:
    shared = row["prompts_sharing"]
    return str(row["prompt"]) if shared <= 1 else f"{row['prompt']} (+{shared - 1} same prefix)"


def same_tables(ds: xr.Dataset, summary: xr.Dataset, spots: xr.Dataset, lead: str,
                chosen: list[str]) -> list[tuple[list[str], str]]:
    """``chosen`` grouped by identical tables (summary and hotspot values), each group with what it means:
    ``zero: ...`` for a metric exactly 0 everywhere (which passes are identical and why), else a phrase.

    Pairs of a pair whose embeddings are frozen come out as two zero pairs and four identical ones.
    """
    groups: list[tuple[list[str], np.ndarray]] = []
    for label in chosen:
        key = np.concatenate([summary.sel({lead: label})[k].values.ravel() for k in ("mean", "min", "max")]
                             + [spots.sel({lead: label}).value.values.ravel()])
        for members, seen in groups:
            if seen.shape == key.shape and np.allclose(seen, key, rtol=1e-9, atol=0, equal_nan=True):
                members.append(label)
                break
        else:
            groups.append(([label], key))
    out = []
    for members, key in groups:
        finite = key[np.isfinite(key)]
        if lead == "pair" and finite.size and not finite.any():
            out.append((members, "zero: " + why_identical(ds, members)))
        else:
            out.append((members, "identical tables" if len(members) > 1 else ""))
    return out


def why_identical(ds: xr.Dataset, pairs: list[str]) -> str:
    """What two passes giving the same residuals means, from the passes' recipes."""
    from analysis.geometry.metrics import store_pass_pairs

    names, left, right = store_pass_pairs(ds)
    passes = [str(p) for p in ds.pass_.values]
    reasons = set()
    for pair in pairs:
        a, b = passes.index(left[names.index(pair)]), passes.index(right[names.index(pair)])
        if str(ds.model.values[a]) == str(ds.model.values[b]) and str(ds.embedding.values[a]) != str(
                ds.embedding.values[b]):
            reasons.add("their passes differ only in the input embedding, so the input embeddings are identical")
        elif str(ds.embedding.values[a]) == str(ds.embedding.values[b]):
            reasons.add("their passes differ only in the body, so the bodies compute the same here")
        else:
            reasons.add("their passes compute the same residuals")
    return "; ".join(sorted(reasons))


def _tracked_section(ds, chosen, lens, top_n, token_ids) -> tuple[list[str], list[dict]]:
    tracked = [int(t) for t in ds.tracked_id.values]
    ids = [t for t in token_ids if t in tracked] if token_ids else tracked
    if not ids:
        return [f"\ntracked logit changes: none of token ids {token_ids} is tracked (tracked: {tracked})"], []
    changes = tracked_changes(ds, CHANGE_THRESHOLD, lens, ids).sel(pair=chosen).compute()
    found = changes.to_series().dropna()
    ordered = found.reindex(found.abs().sort_values(ascending=False).index).head(top_n)
    rows = [{"type": "logit_change", "token_id": int(q), "pair": p, "prompt": int(pr), "layer": int(la),
             "token_idx": int(t), "token": str(token_text_table(ds, int(pr))[int(t)]), "shift": float(v)}
            for (q, p, pr, la, t), v in ordered.items()]
    lines = [f"\ntracked logit changes, {lens} lens, |right - left| >= {CHANGE_THRESHOLD} (top {top_n}):",
             table(["token_id", "pair", "prompt", "layer", "token_idx", "token", "shift"],
                   [[r["token_id"], r["pair"], r["prompt"], r["layer"], r["token_idx"], visible(r["token"]),
                     r["shift"]]
                    for r in rows]) if rows else "(none)"]
    return lines, rows


def _grid_lines(grid_lt: np.ndarray, tokens: np.ndarray, n_real: int, top_n: int) -> list[str]:
    lines = []
    for layer in range(min(top_n, grid_lt.shape[0])):
        cells = [f"{visible(tokens[t])}:{grid_lt[layer, t]:.3f}" for t in range(min(top_n, n_real))
                 if np.isfinite(grid_lt[layer, t])]
        lines.append(f"  L{layer}: " + (", ".join(cells) if cells else "-"))
    return lines


def _token_id_section(ds, chosen, lens, top_n, token_ids, source, prompt) -> list[str]:
    """Grids over (layer, token) of one prompt: a tracked logit, and where the id is among the rises."""
    check_prompt(ds, prompt)
    tracked = [int(t) for t in ds.tracked_id.values] if "tracked_id" in ds.coords else []
    tokens = token_text_table(ds, prompt)
    n_real = int(ds.n_tokens.sel(prompt=prompt))
    lines = []
    for token_id in token_ids:
        for pair in chosen:
            head = f"token {token_id}, pair {pair}, prompt {prompt}, lens {lens}"
            if token_id in tracked:
                traj = tracked_trajectory(ds, token_id, lens).sel(pair=pair, prompt=prompt)
                grid = {"left": traj.logit_left, "right": traj.logit_right, "diff": traj["shift"]}[source]
                lines.append(f"\nlogit grid preview ({source}{' = right - left' if source == 'diff' else ''}; "
                             f"{head}):")
                lines += _grid_lines(grid.values, tokens, n_real, top_n)
            else:
                lines.append(f"\nlogit grid preview: token {token_id} is not tracked in this store "
                             "(capture with --track)")
            if "rise_id" in ds:
                rises = ds.rise_id.sel(pair=pair, lens=lens, prompt=prompt)
                shift = ds.rise_shift.sel(pair=pair, lens=lens, prompt=prompt)
                member = shift.where(rises == token_id).max("k")
                lines.append(f"top-k membership (increase; shift where the token is among the top-k rises; {head}):")
                lines += _grid_lines(member.values, tokens, n_real, top_n)
    return lines


def build_report(ds: xr.Dataset, metrics: list[str] | None = None, axis: str = "layer",
                 record_type: str = "pairwise", top_n: int = 5, lens: str = "norm",
                 labels: list[str] | None = None, token_ids: list[int] | None = None,
                 logit_source: str = "diff", prompt: int = 0, include_massive: bool = False,
                 massive_factor: float = 10.0) -> tuple[str, list[dict]]:
    """Return (text, rows): the report and the rows an export writes (hotspots and tracked changes).

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> text, rows = build_report(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")), top_n=1)
    >>> text.splitlines()[0][:48], sorted({row["type"] for row in rows})
    ('Summary: Fine-tuning changed the residual stream', ['hotspot', 'summary'])
    """
    if top_n < 1:
        raise UsageError(f"--top-n must be at least 1, got {top_n}")
    if logit_source not in LOGIT_SOURCES:
        raise UsageError(f"--logit-source must be one of {', '.join(LOGIT_SOURCES)}, got {logit_source!r}")
    if token_ids and record_type != "pairwise":
        raise UsageError("--token-id works with --record-type pairwise (tracked logits are compared per pair)")
    # Over the real positions only where the metrics allow (a ragged store's residuals): the same numbers as the
    # padded layout, without the padding's elementwise work (15x the real positions on a store of ragged texts)
    layout = layout_for(ds, metrics or ["norm_diff"])
    values, chosen, lead, metrics = _choose(ds, record_type, metrics, lens, labels, layout)
    found, keep = None, None
    if "resid" in ds:  # massive activations: found in the same computation, left out unless asked
        from analysis.geometry.outliers import describe_massive, massive_positions

        found = massive_positions(ds, massive_factor, layout)
        if not include_massive:
            keep = ~found.massive
    extra = {"found": found, "summary": summary_inputs(ds, keep, layout)}  # computed with the tables, sharing reads
    with_rate = record_type == "pairwise" and "topk_id" in ds and ds.sizes.get("k", 0) >= 3
    if with_rate:  # its read of the last layer's statistics runs beside the residuals', not after them
        from analysis.readouts.difflens import shift_rate, shift_rate_interval

        extra["rate"] = (shift_rate(ds).sel(pair=chosen), shift_rate_interval(ds).sel(pair=chosen))
    with_responses = record_type == "pairwise" and responses_text.applies(ds)
    if with_responses:  # the responses' readouts share the reads of the other sections
        extra["responses"] = responses_text.response_inputs(ds)
    lines, rows, extra = _metric_sections(ds, values, metrics, chosen, lead, axis, top_n, lens, extra, keep)
    found = extra["found"]
    n_massive = int(found.massive.sum()) if found is not None else 0
    opening = summary_sentences(ds, extra["summary"], n_massive, not include_massive)
    if found is not None:
        lines = [*describe_massive(ds, found, include_massive), *lines]
    if opening:
        lines = ["Summary: " + " ".join(opening), "", *lines]
    if with_rate:
        rate, bounds = extra["rate"]
        lines.append("\ntoken distribution shift rate (URIAL: share of real positions whose right-pass top-1 token, "
                     "norm lens, last layer, is not in the left pass's top-3; 95% bootstrap interval over prompts):")
        lines.append(table(["pair", "shift rate (95% interval)"],
                           [[str(q), estimate(rate.sel(pair=q), *bounds.sel(pair=q))] for q in chosen]))
        rows += [{"type": "shift_rate", "pair": str(q), "value": float(rate.sel(pair=q)),
                  "low": float(bounds.sel(pair=q, bound="low")), "high": float(bounds.sel(pair=q, bound="high"))}
                 for q in chosen]
    if with_responses:
        lines += responses_text.response_section(ds, extra["responses"], top_n)
    if record_type == "pairwise" and "tracked_logit" in ds:
        more_lines, more_rows = _tracked_section(ds, chosen, lens, top_n, token_ids)
        lines += more_lines
        rows += more_rows
    if token_ids:
        lines += _token_id_section(ds, chosen, lens, top_n, token_ids, logit_source, prompt)
    return "\n".join(lines).lstrip("\n"), rows

