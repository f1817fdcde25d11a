"""States at split layers, carried from a pass to the crossed passes that continue it (``--cross-layers``).

``B>S@L`` continues ``BB`` from layer ``L`` with the SFT model's blocks, but the two models are never
resident at once: while the base model runs ``BB``, its state at each split is kept, in the compute dtype
(never the store's lossy float16), in a file per (pass, split) beside the store, ``<store>.carry/``; the SFT
model's step reads it back batch by batch. Tokens are laid out flat in store order, each prompt's full
forward length (a ``--positions`` window still needs every earlier position), so a write group is one
contiguous slice. A record per (pass, split) holds, per prompt, the CRC-32 of its state's bytes once they are
on disk (-1 before): a run killed before the crossed passes finished finds them there, and a state read back
is checked against it, so that a changed or damaged file never feeds a crossed pass (the damaged prompts are
marked not done and the run stops; rerunning recomputes them). The folder is removed once every crossed
pass is done.

Legend: g prompt in a write group, b prompt in a batch, t token, d hidden dimension.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from capture.errors import CarriedStateDamaged
from store.atomic import atomic_output, remove_path

NOT_WRITTEN = -1  # a prompt's checksum before its state is on disk

_RAW = {2: np.int16, 4: np.int32, 8: np.int64}  # a dtype's bytes as numpy holds them (bfloat16 has no numpy dtype)
_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as a same-sized integer tensor (copies to numpy whatever its float dtype)."""
    return tensor.view(_VIEW[tensor.element_size()])


class Carry:
    """The carried states of one store: ``lengths`` (each prompt's forward tokens, store order), ``hidden``,
    ``dtype`` (the compute dtype)."""

    def __init__(self, store: str | Path, lengths: list[int], hidden: int, dtype: torch.dtype,
                 names: list[str] | None = None) -> None:
        store = Path(store)
        self.names = names  # the passes' names, for messages
        self.folder = store.with_name(store.name + ".carry")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.lengths, self.hidden, self.dtype = list(lengths), hidden, dtype
        self.raw_dtype = _RAW[torch.empty(0, dtype=dtype).element_size()]

    def _file(self, source: int, split: int) -> Path:
        return self.folder / f"pass{source}-split{split}.bin"

    def _record(self, source: int, split: int) -> Path:
        return self.folder / f"pass{source}-split{split}.crc.npy"

    def _map(self, source: int, split: int, mode: str) -> np.memmap:
        shape = (int(self.offsets[-1]), self.hidden)
        return np.memmap(self._file(source, split), dtype=self.raw_dtype, mode=mode, shape=shape)

    def checksums(self, source: int, split: int) -> np.ndarray:
        """Per prompt: the CRC-32 of its state on disk, or :data:`NOT_WRITTEN` (int64)."""
        record = self._record(source, split)
        return np.load(record) if record.exists() else np.full(len(self.lengths), NOT_WRITTEN, dtype=np.int64)

    def done(self, source: int, split: int) -> np.ndarray:
        """Per prompt: its state is on disk."""
        return self.checksums(source, split) != NOT_WRITTEN

    def _save(self, source: int, split: int, crc: np.ndarray) -> None:
        with atomic_output(self._record(source, split), suffix=".partial.npy") as tmp:
            np.save(tmp, crc)

    def write(self, source: int, split: int, rows: slice, state_gtd: np.ndarray) -> None:
        """Keep a write group's states (raw, padded to the group's longest prompt), then record their checksums."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(source, split)
        if not path.exists():
            self._map(source, split, "w+").flush()
        flat = self._map(source, split, "r+")
        crc = self.checksums(source, split)
        for at, row in enumerate(range(rows.start, rows.stop)):
            state_td = np.ascontiguousarray(state_gtd[at, : self.lengths[row]])
            flat[self.offsets[row]: self.offsets[row + 1]] = state_td
            crc[row] = zlib.crc32(state_td.data)
        flat.flush()
        self._save(source, split, crc)

    def read(self, source: int, split: int, rows: range, width: int) -> torch.Tensor:
        """A batch's states, (b, width, d), zero past each prompt's length (masked there anyway), each checked
        against its checksum (:class:`capture.errors.CarriedStateDamaged` if one fails)."""
        flat = self._map(source, split, "r")
        crc = self.checksums(source, split)
        out = np.zeros((len(rows), width, self.hidden), dtype=self.raw_dtype)
        bad = []
        for at, row in enumerate(rows):
            out[at, : self.lengths[row]] = flat[self.offsets[row]: self.offsets[row + 1]]
            if zlib.crc32(np.ascontiguousarray(out[at, : self.lengths[row]]).data) != crc[row]:
                bad.append(row)
        if bad:
            crc[bad] = NOT_WRITTEN  # recomputed on the next run
            self._save(source, split, crc)
            name = self.names[source] if self.names else f"pass {source}"
            which = f"{len(bad)} prompt{'s' if len(bad) > 1 else ''} of {name} at split {split}"
            raise CarriedStateDamaged(which=which, folder=str(self.folder))
        return torch.from_numpy(out).view(self.dtype)

    def discard(self) -> None:
        remove_path(self.folder)


@dataclass
class Crossing:
    """What a capture step's passes carry and continue: ``splits_of`` a pass's splits whose states later
    crossed passes read, ``source_of`` each crossed pass's source pass."""

    carry: Carry
    splits_of: dict[int, tuple[int, ...]] = field(default_factory=dict)
    source_of: dict[int, int] = field(default_factory=dict)

    def batch_plan(self, pass_index: int, spec, batch: slice, lengths: list[int]
                   ) -> tuple[tuple[int, ...], tuple[int, torch.Tensor] | None]:
        """(splits to carry, (split, state) to start from or None) of one batch of a pass."""
        start = None
        if spec.crossed:
            state = self.carry.read(self.source_of[pass_index], spec.split, range(batch.start, batch.stop),
                                    max(lengths[batch.start: batch.stop]))
            start = (spec.split, state)
        return self.splits_of.get(pass_index, ()), start


def crossing_for(prep) -> Crossing:
    """The crossing of a capture whose passes include crossed ones (``prep``: ``capture.plan.prepare.Prepared``)."""
    from capture.models.loading import DTYPES
    from capture.plan.passes import source_pass

    carry = Carry(prep.path, prep.tokenized.lengths, prep.shapes["base"].hidden, DTYPES[prep.resolved.dtype],
                  [p.name for p in prep.passes])
    return Crossing(carry, source_of={i: source_pass(prep.passes, p) for i, p in enumerate(prep.passes) if p.crossed})


def carry_needs(prep, crossing: Crossing | None, step, done_pp: np.ndarray, groups: list[slice]
                ) -> dict[int, dict[int, bool]]:
    """Per pass of ``step`` and write group (by its first row): the group must run (again) to carry a state
    that a crossed pass not yet done will read, and that is not on disk."""
    if crossing is None:
        return {}
    needs: dict[int, dict[int, bool]] = {}
    for source, split in step.carry:
        on_disk = crossing.carry.done(source, split)
        readers = [i for i, p in enumerate(prep.passes) if p.crossed and p.split == split
                   and crossing.source_of[i] == source]
        for group in groups:
            if not on_disk[group].all() and not all(done_pp[i, group].all() for i in readers):
                needs.setdefault(source, {})[group.start] = True
    return needs


def group_writer(writer, prep, crossing: Crossing | None):
    """How the capture job writes one computed group: a crossed pass's layers up to its split are its source
    pass's, copied from the store (written in an earlier step); carried states go beside the store."""
    from store.reader import ArrayRegions

    stored = ArrayRegions(writer.path, "resid", writer.storage_options)  # chunk files read directly where local

    def write(group) -> None:
        spec = prep.passes[group.pass_index]
        if spec.crossed:
            # the stored layers up to the split: a prefix of the kept layers (sorted)
            n_lower = sum(1 for layer in prep.window.layers if layer <= spec.split)
            source = crossing.source_of[group.pass_index]
            if n_lower:
                where = (slice(source, source + 1), slice(group.prompts.start, group.prompts.stop),
                         slice(0, n_lower), slice(0, group.resid_gltd.shape[2]), slice(None))
                group.resid_gltd[:, :n_lower] = stored.read(where)[0]
        writer.write_region(group.pass_index, group.prompts, group.resid_gltd, group.final_gtd)
        if group.carry_gstd is not None:
            for k, split in enumerate(crossing.splits_of[group.pass_index]):
                crossing.carry.write(group.pass_index, split, group.prompts, group.carry_gstd[:, k])

    return write
