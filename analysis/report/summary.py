"""The few sentences that open ``report`` and the HTML page: what changed, where in depth, what it does.

Generated from the numbers, never from templates of expected results: the factorial shares
say whether the embeddings or the body carry the change, the per-layer relative change says
where in depth it enters, the last layer's KL and shift rate what it does to the output, and
the massive-activation count what was left out. Each sentence is skipped when its numbers
are not there (no standard passes, no lens statistics).
"""

from __future__ import annotations

import warnings

import dask
import numpy as np
import xarray as xr

from analysis.compute.bootstrap import ratio_interval
from store.completeness import UNFINISHED_LENS_ATTR
from store.schema import lens_layers

DOMINANT = 0.8  # a share at least this large "carries" the change
ZERO = 1e-12  # relative changes below this are no change (float64 sums of identical values are exactly 0)


def headline_pair(ds: xr.Dataset) -> tuple[str, str, str] | None:
    """(name, left, right) of the pair the summaries follow: BB-SS when the store has it, else its first pair."""
    from analysis.geometry.metrics import store_pass_pairs

    names, left, right = store_pass_pairs(ds)
    if not names:
        return None
    i = names.index("BB-SS") if "BB-SS" in names else 0
    return names[i], left[i], right[i]


def summary_inputs(ds: xr.Dataset, keep: xr.DataArray | None = None, layout: str = "padded") -> dict:
    """The lazy numbers the summary needs (compute them with the rest of a report, in one ``dask.compute``);
    ``layout`` as the report's metrics' (``analysis.geometry.metrics.pair_metrics``), so that they share reads."""
    from analysis.compute.reductions import position_mean
    from analysis.geometry.metrics import pair_metrics
    from analysis.readouts.factorial import FACTORIAL_PASSES, factorial_sums

    out: dict = {}
    chosen = headline_pair(ds)
    if chosen is None or "resid" not in ds:
        return out
    pair = chosen[0]
    rel = pair_metrics(ds, "norm", ["rel_norm_diff"], layout).rel_norm_diff.sel(pair=pair, drop=True)
    n_tokens = np.asarray(ds.n_tokens.values)
    out["rel_by_layer"] = position_mean(rel, n_tokens, keep)  # real positions only, not the padded layout
    if set(FACTORIAL_PASSES) <= {str(p) for p in ds.pass_.values}:
        # from the pair sums the report reads anyway, where it can; per prompt, for the intervals
        per_prompt = factorial_sums(ds, over=("token",), where=keep, layout=layout).sum("layer")  # (term, prompt)
        out["factorial"] = factorial_sums(ds, where=keep, layout=layout)
        out["factorial_bounds"] = {t: ratio_interval(per_prompt.sel(term=t), per_prompt.sel(term="total_sq"))
                                   for t in ("embedding_sq", "body_sq", "interaction_sq")}
    if "kl" in ds and pair in [str(q) for q in ds.pair.values]:  # over every real position, as the shift rate
        from analysis.compute import lens_sums

        out["kl_layer"] = lens_layers(ds)[-1]
        top3 = "topk_id" in ds and ds.sizes.get("k", 0) >= 3
        if lens_sums.applies(ds):  # streamed reads of the last layer's statistics
            counts = lens_sums.last_layer_counts(ds, [], [pair])  # (count, prompt): KL sum, positions
            kl_p, n_p = counts[0], counts[1]
        else:
            kl = ds.kl.sel(lens="norm", pair=pair, drop=True).sel(layer=out["kl_layer"], drop=True)
            real = ds.token < ds.n_tokens
            kl_p, n_p = kl.where(real).sum("token"), real.sum("token").astype(np.float64)
        rate_p = None
        if top3:  # the report's shift rate table reads the same counts (one read of the top-k ids)
            from analysis.readouts.difflens import shift_counts

            counts = shift_counts(ds)
            rate_p, n_rate_p = counts.shifted.sel(pair=pair, drop=True), counts.positions
        out["kl_last"] = kl_p.sum("prompt") / n_p.sum("prompt")
        out["kl_last_bounds"] = ratio_interval(kl_p, n_p)
        if rate_p is not None:
            out["shift_rate"] = rate_p.sum("prompt") / n_rate_p.sum("prompt")
            out["shift_rate_bounds"] = ratio_interval(rate_p, n_rate_p)
    return out


def summary_sentences(ds: xr.Dataset, computed: dict, n_massive: int = 0, massive_left_out: bool = True) -> list[str]:
    """Three to five sentences from :func:`summary_inputs` (computed)."""
    chosen = headline_pair(ds)
    if chosen is None or "rel_by_layer" not in computed:
        return []
    _, left, right = chosen
    sentences = []
    if "factorial" in computed:
        sentences.append(_where_sentence(computed["factorial"], computed.get("factorial_bounds", {})))
    sentences.append(_depth_sentence(computed["rel_by_layer"], left, right))
    if "kl_last" in computed:
        kl = float(computed["kl_last"])
        last = int(computed["kl_layer"])
        where = "the last layer" if last == int(ds.layer.values[-1]) else f"layer {last} (the last with statistics)"
        text = (f"At {where}, under the norm lens, KL({right} || {left}) averages {kl:.3g}"
                f"{_interval(computed.get('kl_last_bounds'), '.3g')} nats per position")
        if "shift_rate" in computed and np.isfinite(float(computed["shift_rate"])):
            text += (f", and {100 * float(computed['shift_rate']):.1f}%"
                     f"{_interval(computed.get('shift_rate_bounds'), '.1f', 100, '%')} of positions have a {right} "
                     f"top-1 token outside {left}'s top 3 (the shift rate)")
        sentences.append(text + (" (in parentheses: 95% bootstrap intervals over prompts)." if "kl_last_bounds" in
                                 computed else "."))
    else:
        sentences.append("What this does to the output is not shown: " + _no_lens(ds) + ".")
    if n_massive:
        sentences.append(f"{n_massive} massive-activation positions (attention sinks) are "
                         + ("left out of the residual numbers." if massive_left_out else
                            "included in the residual numbers."))
    return sentences


def _no_lens(ds: xr.Dataset) -> str:
    state = ds.attrs.get(UNFINISHED_LENS_ATTR)
    if not state:
        return "this store has no lens statistics"
    done, total = state.split("/")
    return f"its lens statistics are unfinished ({done} of {total} prompts done; see the note above)"


def _interval(bounds: xr.DataArray | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    """`` (low–high)`` of a computed interval (``bound``: low, high), empty where there is none."""
    if bounds is None:
        return ""
    low, high = (scale * float(bounds.sel(bound=b)) for b in ("low", "high"))
    if not (np.isfinite(low) and np.isfinite(high)):
        return ""
    return f" ({low:{spec}} to {high:{spec}}{unit})"


def _where_sentence(sums: xr.DataArray, bounds: dict) -> str:
    """Embeddings or body, from the factorial terms summed over every layer (``bounds``: their shares' 95%
    intervals, by term)."""
    total = float(sums.sel(term="total_sq").sum())
    if total <= 0:
        return "The two models compute the same residual stream: SS and BB are identical at every layer."
    emb, body = (float(sums.sel(term=t).sum()) / total for t in ("embedding_sq", "body_sq"))
    inter = float(sums.sel(term="interaction_sq").sum()) / total
    if emb <= ZERO:
        where = "entirely through the body (the input embeddings are identical)"
    elif body <= ZERO:
        where = "entirely through the input embeddings (the bodies compute the same)"
    elif body >= DOMINANT:
        where = "mostly through the body"
    elif emb >= DOMINANT:
        where = "mostly through the input embeddings"
    else:
        where = "through both the input embeddings and the body"
    def share(value: float, term: str) -> str:
        return f"{100 * value:.0f}%{_interval(bounds.get(term), '.0f', 100, '%')}"

    return (f"Fine-tuning changed the residual stream {where}: over all layers the body main effect carries "
            f"{share(body, 'body_sq')} of sum |h_SS - h_BB|^2, the embedding main effect {share(emb, 'embedding_sq')}, "
            f"and their interaction is {share(inter, 'interaction_sq')} of it"
            + (" (95% bootstrap intervals over prompts)." if bounds else "."))


def _depth_sentence(rel: xr.DataArray, left: str, right: str) -> str:
    """Where in depth the change enters and how it grows."""
    layers = [int(la) for la in rel.layer.values]
    values = np.nan_to_num(np.asarray(rel.values, dtype=np.float64), nan=0.0)
    what = f"the mean relative change ||h_{right} - h_{left}|| / ||h_{left}||"
    changed = np.flatnonzero(values > ZERO)
    if not changed.size:
        return f"{what[0].upper()}{what[1:]} is 0 at every stored layer."
    first, peak = int(changed[0]), int(np.argmax(values))
    half = int(np.flatnonzero(values >= values[peak] / 2)[0])
    numbers = (f"{what} is {values[first]:.3g} at layer {layers[first]} and {values[-1]:.3g} at layer "
               f"{layers[-1]}, largest ({values[peak]:.3g}) at layer {layers[peak]}")
    if layers[first] > 1:  # layer 0 is the embedding output; a first change at layer 1 says nothing
        text = f"Nothing changes before layer {layers[first]} ({left} and {right} are identical there); from it on, "
        text += numbers
    else:
        text = numbers[0].upper() + numbers[1:]
    return text + f"; it first reaches half its largest value at layer {layers[half]}."


def report_summary(ds: xr.Dataset, keep: xr.DataArray | None = None, n_massive: int = 0,
                   massive_left_out: bool = True) -> list[str]:
    """:func:`summary_sentences` computed on its own (the HTML page; ``report`` shares its reads instead).

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> sentences = report_summary(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> len(sentences), sentences[0][:48]
    (3, 'Fine-tuning changed the residual stream through ')
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(invalid value|Mean of empty|All-NaN)", RuntimeWarning)
        (computed,) = dask.compute(summary_inputs(ds, keep))
    return summary_sentences(ds, computed, n_massive, massive_left_out)
