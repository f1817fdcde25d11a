"""The torch side of :mod:`analysis.loader.activations`: an ``IterableDataset`` over a selection.

Imported only when a loader is built (``import analysis`` stays torch-free).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from analysis.loader.reads import (
    Selection,
    open_resid,
    read_unit,
    shape_rows,
    shard_units,
    shuffled_batches,
    unit_positions,
)
from store.units import format_bytes

PREFETCH = 4  # units read ahead of the one being shuffled in, on READERS threads (memory: this many units more)
READERS = 2


class ActivationLoader(torch.utils.data.IterableDataset):
    """Batches of one epoch of a :class:`~analysis.loader.reads.Selection` (build with
    :func:`analysis.loader.activations.activation_loader`)."""

    def __init__(self, selection: Selection, *, batch_size: int, shuffle: bool, seed: int, capacity: int,
                 dtype: str, rank: int, world_size: int, with_positions: bool, drop_last: bool) -> None:
        super().__init__()
        self.selection, self.batch_size, self.shuffle, self.seed = selection, batch_size, shuffle, seed
        self.capacity, self.dtype, self.rank, self.world_size = capacity, dtype, rank, world_size
        self.with_positions, self.drop_last, self.epoch = with_positions, drop_last, 0

    @property
    def scales(self) -> np.ndarray | None:
        """The normalisation factors, (n_layers, n_passes), or None."""
        return self.selection.scales

    @property
    def n_rows(self) -> int:
        """Selected positions in the whole store (all ranks)."""
        return self.selection.n_rows

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from the next iteration on (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _rank_units(self) -> list[int]:
        return shard_units(len(self.selection.units), self.seed, self.epoch, self.shuffle, self.rank,
                           self.world_size)

    def __len__(self) -> int:
        rows = sum(self.selection.units[i].n for i in self._rank_units())
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _chunks(self, unit_ids: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each unit's shaped rows and positions, read ``PREFETCH`` units ahead on a thread (zarr decodes
        and reads without the GIL, so the reads overlap each other, the shuffling and the trainer)."""
        resid, sel = open_resid(self.selection), self.selection

        def load(i: int):
            unit = sel.units[i]
            return shape_rows(sel, read_unit(resid, sel, unit)), unit_positions(sel, unit)

        with ThreadPoolExecutor(READERS, thread_name_prefix="resdiff-loader") as pool:
            ahead = deque(pool.submit(load, i) for i in unit_ids[:PREFETCH])
            for i in unit_ids[PREFETCH:]:
                ready = ahead.popleft().result()
                ahead.append(pool.submit(load, i))
                yield ready
            while ahead:
                yield ahead.popleft().result()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shard = self.rank * n_workers + worker
        unit_ids = shard_units(len(self.selection.units), self.seed, self.epoch, self.shuffle, shard,
                               self.world_size * n_workers)
        rng = np.random.default_rng([self.seed, self.epoch, shard, 1])
        if not self.shuffle:  # in store order, batches straight from the units
            capacity = self.batch_size
            rng = None
        else:
            # The buffer is shared out among the workers, and never larger than this shard's rows.
            capacity = max(self.capacity // n_workers, self.batch_size)
            capacity = max(1, min(capacity, sum(self.selection.units[i].n for i in unit_ids)))
        target = getattr(torch, self.dtype)  # a name of store.units.MODEL_DTYPES (the loader checks which)
        for rows, where in shuffled_batches(self._chunks(unit_ids), capacity, self.batch_size, rng, self.drop_last):
            out = torch.from_numpy(rows).to(target)
            yield (out, torch.from_numpy(where)) if self.with_positions else out

    def describe(self) -> dict:
        """What an epoch holds and what the loader keeps in memory."""
        sel = self.selection
        return {"rows": sel.n_rows, "units": len(sel.units), "row_shape": list(sel.row_shape),
                "passes": sel.pass_names, "difference": sel.difference, "excluded_massive": sel.excluded_massive,
                "batches_per_epoch": len(self), "shuffle_buffer_rows": self.capacity,
                "shuffle_buffer_bytes": self.capacity * 4 * int(np.prod(sel.row_shape)),
                "unit_read_bytes": sel.chunk_bytes,
                "scales": None if sel.scales is None else sel.scales.tolist()}

    def __repr__(self) -> str:
        d = self.describe()
        return (f"ActivationLoader({d['rows']} rows in {d['units']} units, batches of {self.batch_size} x "
                f"{tuple(d['row_shape'])}, buffer {format_bytes(d['shuffle_buffer_bytes'])})")

