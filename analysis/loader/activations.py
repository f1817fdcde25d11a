"""Shuffled, paired activation batches from a store, for training dictionaries (SAEs, crosscoders).

Axes legend: n = row (one real position), m = model axis (a pass, or a layer x pass), d = dim.

A store already holds the paired activations of the four passes; :func:`activation_loader`
turns a selection of them into batches a trainer can iterate:

- ``passes=("BB", "SS")`` gives the crosscoder layout ``(batch, n_passes, dim)``;
  ``pair="BB-SS"`` gives differences ``h_SS - h_BB`` as ``(batch, dim)``; a list of
  layers adds a layer axis after the batch axis.
- Rows are real positions only (padding never appears), the first ``positions`` of each
  prompt or all; massive-activation positions (``analysis.geometry.outliers``) are left out unless
  ``include_massive``, as everywhere in the analysis; ``kinds`` and ``roles`` select token
  kinds (``special``/``text``) and chat roles.
- Shuffling: the units of work are the store's (prompt chunk, token chunk) blocks, each
  read once per epoch in a random order; their rows fill a shuffle buffer of at most
  ``shuffle_buffer`` bytes, which is permuted and cut into batches each time it is full
  (so a batch mixes rows from every unit in the buffer: about ``buffer / unit`` units). The order depends only
  on ``seed``, the epoch (``set_epoch``) and the shard: units are dealt round-robin to
  ``world_size`` ranks and, within a rank, to the DataLoader workers, so every selected
  position appears exactly once per epoch across all of them.
- ``normalize=True`` scales each pass (and layer) so that its mean row norm is
  ``sqrt(dim)`` (the crosscoder convention); the factors are computed once from a
  deterministic sample of the selection and kept in ``loader.scales`` (pass them back
  as ``scales=`` to reuse them).

Memory: the shuffle buffer plus one unit (one store chunk per pass) per worker. Torch is
imported only when a loader is built, so ``import analysis`` stays torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analysis.loader.reads import buffer_rows, norm_scales, open_resid, select
from store.errors import UsageError
from store.location import StorePath
from store.units import LOADER_DTYPES


def activation_loader(store: StorePath, layer, *, passes: Sequence[str] | None = None, pair: str | None = None,
                      batch_size: int = 4096, shuffle: bool = True, seed: int = 0, shuffle_buffer="512MiB",
                      positions="all", include_massive: bool = False, massive_factor: float = 10.0,
                      kinds: Sequence[str] | None = None, roles: Sequence[str] | None = None,
                      normalize: bool = False, scales=None, dtype: str = "float32", rank: int = 0,
                      world_size: int = 1, with_positions: bool = False, drop_last: bool = False,
                      storage_options: dict | None = None):
    """A torch ``IterableDataset`` of activation batches from ``store`` (see the module docstring).

    Iterate it directly, or wrap it as ``DataLoader(loader, batch_size=None, num_workers=N)``
    (it batches itself). ``loader.set_epoch(e)`` changes the order per epoch; ``len(loader)``
    is the number of batches of one epoch (this rank, all its workers); ``loader.describe()``
    what it holds. With ``with_positions`` each batch is ``(activations, positions)``, the
    positions ``(batch, 2)`` holding each row's prompt label and token position.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> path = write_tiny_store(tempfile.mkdtemp() + "/s.zarr", lengths=(5, 3, 4))
    >>> loader = activation_loader(path, layer=1, passes=("BB", "SS"), batch_size=4, shuffle_buffer="4KiB")
    >>> loader.n_rows, [tuple(b.shape) for b in loader][:2]
    (12, [(4, 2, 8), (4, 2, 8)])
    >>> [tuple(b.shape) for b in activation_loader(path, layer=[0, 1], pair="BB-SS", batch_size=8)]
    [(8, 2, 8), (4, 2, 8)]
    """
    from analysis.loader.torch_dataset import ActivationLoader

    if batch_size < 1:
        raise UsageError(f"batch_size must be at least 1, got {batch_size}")
    if dtype not in LOADER_DTYPES:
        raise UsageError(f"dtype must be one of {', '.join(LOADER_DTYPES)}, got {dtype!r}")
    if not 0 <= rank < world_size:
        raise UsageError(f"rank must be in 0..world_size-1, got rank {rank} of {world_size}")
    sel = select(store, layer, passes, pair, positions, include_massive, massive_factor, kinds, roles,
                 storage_options)
    if scales is not None:
        sel.scales = np.asarray(scales, dtype=np.float32).reshape(len(sel.layer_index), len(sel.pass_index))
    elif normalize and sel.units:
        sel.scales = norm_scales(open_resid(sel), sel, seed)
    capacity = buffer_rows(sel, shuffle_buffer, batch_size)
    return ActivationLoader(sel, batch_size=batch_size, shuffle=shuffle, seed=seed, capacity=capacity, dtype=dtype,
                            rank=rank, world_size=world_size, with_positions=with_positions, drop_last=drop_last)
