"""Lazy analysis of resdiff stores (Dask-backed; nothing is computed until asked).

The metrics, reports and decompositions arrive with their issues; for now the entry
point is :func:`open_store`, which opens a store lazily after checking it.
"""

from store.reader import open_store

__all__ = ["open_store"]
