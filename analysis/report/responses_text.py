"""The responses section of ``report`` and of the HTML page (a ``capture --generate`` store): the
shallow-alignment curve, the means around the first divergence, and the first-divergence table with the
response text on both sides.

The inputs are lazy (:func:`response_inputs`); they are computed with the other numbers of a report, then
turned into text and rows here. A statistic that was not computed is shown as ``–``, never as a number.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.readouts.divergence import (
    RESPONSE,
    around_divergence,
    first_divergence,
    response_curve,
    response_readouts,
)
from analysis.readouts.tokens import token_text_table, token_texts, visible
from analysis.report.summary import headline_pair
from analysis.report.tables import estimate, estimate_of, table

CURVE_ROWS = 16  # response positions listed in the text report (the figure shows them all)
CONTEXT_CHARS = 32  # response text shown on each side of a divergence
ONE_LINE = str.maketrans({"\n": "⏎", "\r": "␍", "\t": "⇥"})  # a table row stays one line


def applies(ds: xr.Dataset) -> bool:
    """Whether ``ds`` holds responses with the statistics this section reads."""
    return "response_start" in ds.coords and "topk_id" in ds and ds.sizes.get("k", 0) >= 3


def response_inputs(ds: xr.Dataset) -> dict:
    """Lazy: the curve of every pair, and for the headline pair (``summary.headline_pair``) the means around its
    first divergence, each prompt's first divergence and both passes' top-1 tokens there."""
    pair, _, _ = headline_pair(ds)
    readouts = response_readouts(ds)
    first = first_divergence(ds, readouts).sel(pair=pair)
    at_first = readouts.sel(pair=pair).where(readouts[RESPONSE] == first)
    return {"curve": response_curve(ds, readouts), "around": around_divergence(ds, pair, readouts=readouts),
            "first": first, "left_top1": at_first["left_top1"].max(RESPONSE),
            "right_top1": at_first["right_top1"].max(RESPONSE)}


def curve_rows(curve: xr.Dataset, pair: str, limit: int | None = CURVE_ROWS) -> list[list]:
    """Rows (position, prompts, KL, log-prob diff, shift rate) of one pair's computed curve."""
    one = curve.sel(pair=pair)
    rows = []
    for j in range(one.sizes[RESPONSE] if limit is None else min(limit, one.sizes[RESPONSE])):
        at = one.isel({RESPONSE: j})
        logprob = estimate_of(at, "logprob_diff") if "logprob_diff" in at else "–"
        rows.append([j, int(at["n"]), estimate_of(at, "kl"), logprob, estimate_of(at, "shift_rate")])
    return rows


def divergence_rows(ds: xr.Dataset, computed: dict, limit: int) -> list[list]:
    """The first ``limit`` prompts that diverge, earliest divergence first: prompt, position, the response
    before it, the token written there, each pass's top-1 token, the response after it."""
    first = np.asarray(computed["first"].values)
    order = [i for i in np.argsort(first, kind="stable") if first[i] >= 0][:limit]
    left, right = (np.asarray(computed[k].values) for k in ("left_top1", "right_top1"))
    ids = np.concatenate([left[order], right[order]]).astype(np.int64) if order else np.zeros(0, np.int64)
    names = token_texts(ds, ids)
    rows = []
    for n, row in enumerate(order):
        label = int(ds.prompt.values[row])
        texts = token_text_table(ds, label)
        start, stop = int(ds.response_start.values[row]), int(ds.n_tokens.values[row])
        at = start + int(first[row])
        before = "".join(texts[start:at]).translate(ONE_LINE)[-CONTEXT_CHARS:]
        after = "".join(texts[at + 1: stop]).translate(ONE_LINE)[:CONTEXT_CHARS]
        rows.append([label, int(first[row]), before, visible(texts[at]) if at < stop else "∅",
                     visible(names[n]), visible(names[len(order) + n]), after])
    return rows


def response_section(ds: xr.Dataset, computed: dict, top_n: int) -> list[str]:
    """The report's text for a store with responses (``computed``: :func:`response_inputs`, computed)."""
    pair, left, right = headline_pair(ds)
    generation = ds.attrs.get("generation", {})
    by = f" by the {generation['model']} model, {generation.get('decoding', 'greedy')}" if generation else ""
    first = np.asarray(computed["first"].values)
    diverged = first[first >= 0]
    lines = [f"\nresponses (generated{by}; norm lens at the last layer, the models' output; position j predicts "
             f"response token j):"]
    if diverged.size:
        lines.append(f"{diverged.size} of {first.size} responses see {left} and {right} choose different greedy "
                     f"tokens; the first divergence is at response position {int(np.median(diverged))} (median; "
                     f"earliest {int(diverged.min())}, latest {int(diverged.max())})")
    else:
        lines.append(f"{left} and {right} choose the same greedy token at every response position of every prompt")
    lines.append(f"by response position (the shallow-alignment curve, {pair}: KL({right} || {left}), log-prob "
                 f"difference {right} - {left} of the response's token, URIAL shift rate; each mean with its 95% "
                 "bootstrap interval over prompts):")
    lines.append(table(["position", "prompts", "KL", "logprob diff", "shift rate"],
                       curve_rows(computed["curve"], pair)))
    if diverged.size:
        around = computed["around"]
        lines.append(f"around the first divergence ({pair}; offset 0 is the divergence):")
        lines.append(table(["offset", "prompts", "KL", "logprob diff", "shift rate"], [
            [int(o), int(around["n"].sel(offset=o)), estimate(around["kl"].sel(offset=o)),
             estimate(around["logprob_diff"].sel(offset=o)) if "logprob_diff" in around else "–",
             estimate(around["shift_rate"].sel(offset=o))] for o in around.offset.values]))
        lines.append("first divergences (earliest first):")
        lines.append(table(["prompt", "position", "before", "written", f"{left} top-1", f"{right} top-1", "after"],
                           divergence_rows(ds, computed, top_n)))
    return lines
