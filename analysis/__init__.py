"""Lazy analysis of resdiff stores (Dask-backed; nothing is computed until asked).

The metrics, reports and decompositions arrive with their issues; for now the entry
point is :func:`open_store`, which opens a store lazily after checking it.
"""

from analysis.lens import LensNotSaved, lens_logits
from analysis.metrics import pair_metrics, pass_metrics, summarize_over
from store.reader import open_store

__all__ = ["LensNotSaved", "lens_logits", "open_store", "pair_metrics", "pass_metrics", "summarize_over"]
