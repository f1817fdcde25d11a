"""Lazy analysis of resdiff stores (Dask-backed; nothing is computed until asked).

:func:`open_store` opens a store lazily after checking it; :mod:`analysis.geometry.metrics`
derives the geometric metrics per pass and per pair and summarises them;
:mod:`analysis.compute.reductions` finds hotspots, correlations and seven-number summaries;
:mod:`analysis.readouts.tracked` follows tracked tokens; :func:`factorial` and :func:`factorial_shares` split
each change into embeddings, body and interaction; :func:`diff_lens` reads each pair's mean difference
through the unembedding and :func:`shift_rate` counts top-token shifts (:func:`shift_rate_interval`, its 95%
bootstrap interval over prompts, as every summary's: :mod:`analysis.compute.bootstrap`); on a ``capture --generate``
store, :func:`response_curve` and :func:`first_divergence` read what the models say over the generated
responses; :func:`crossing_profile` says where in depth the change enters (``--cross-layers``);
:func:`decompose` gives spectra, ranks and tensor decompositions of the differences;
:func:`report_summary` is ``report``'s opening in sentences; :mod:`analysis.readouts.saved_lens` computes lens
logits of any token from a store's saved lens; :func:`activation_loader` feeds shuffled, paired
activation batches to dictionary-learning trainers (torch is imported only when one is built).
The errors a notebook may want to catch (:class:`ResdiffError` and its subclasses from
:mod:`store.errors`) are re-exported here.
"""

from analysis.compute.positions import real_positions
from analysis.compute.reductions import correlation, hotspots, seven_number_summary
from analysis.geometry.decompose import decompose
from analysis.geometry.metrics import open_stores, pair_metrics, pass_metrics, summarize_over
from analysis.loader.activations import activation_loader
from analysis.readouts.crossing import crossing_profile
from analysis.readouts.difflens import diff_lens, shift_rate, shift_rate_interval
from analysis.readouts.divergence import around_divergence, first_divergence, response_curve, response_readouts
from analysis.readouts.factorial import factorial, factorial_shares
from analysis.readouts.saved_lens import lens_logits
from analysis.readouts.tracked import tracked_changes, tracked_trajectory
from analysis.report.summary import report_summary
from store.errors import LensNotSaved, MissingData, ResdiffError, StoreFormatError, StoreNotFound, UsageError
from store.reader import open_store

__all__ = [
    "LensNotSaved", "MissingData", "ResdiffError", "StoreFormatError", "StoreNotFound", "UsageError",
    "activation_loader", "around_divergence", "correlation", "crossing_profile", "decompose", "diff_lens", "factorial",
    "factorial_shares", "first_divergence", "hotspots", "lens_logits", "open_store", "open_stores", "pair_metrics",
    "pass_metrics", "real_positions", "report_summary", "response_curve", "response_readouts", "seven_number_summary",
    "shift_rate", "shift_rate_interval", "summarize_over", "tracked_changes", "tracked_trajectory",
]
