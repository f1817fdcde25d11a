"""Writing a store incrementally: a template first, then whole-chunk regions, each
followed by its ``done`` flag.

Regions are written directly (chunk files, ``store.chunk_io``; whole shards, ``store.shard_io``)
or with zarr, not through xarray, because they are plain array slices of a layout the template
already fixed. The ``done`` flag of a region is set only after all its data has been written
(in a sharded store, format 4, after its whole shard row is), so a reader that trusts ``done``
never sees a half-written region.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from store.atomic import atomic_output
from store.chunk_io import ChunkFiles
from store.chunking import chunk_slices, token_extent
from store.errors import StoreFormatError
from store.location import (
    CREATING_ATTR,
    StorePath,
    filesystem,
    is_url,
    normalize,
    read_root_metadata,
    remove,
    xarray_kwargs,
    zarr_store,
)
from store.schema import FORMAT_ATTR, encoding, shard_shapes
from store.shard_io import ShardFiles, direct_files
from store.units import DEFAULT_CODEC


def consolidate(path: StorePath, storage_options: dict | None = None) -> None:
    """Consolidate metadata so that a plain ``xr.open_zarr(path)`` opens fast and silently."""
    with warnings.catch_warnings():
        # Zarr 3 warns that consolidated metadata is not in the v3 spec; we rely on it on purpose.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(zarr_store(path, storage_options))


FAULT_ENV = "RESDIFF_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(kind: str) -> None:
    """Testing hook: with ``RESDIFF_FAULT=KIND:N`` the process kills itself (SIGKILL) at the N-th
    ``fault_point(KIND)``. The crash-resume tests use it to die in the middle of a write; unset, it
    does nothing."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted.startswith(kind + ":"):
        return
    _fault_counts[kind] = _fault_counts.get(kind, 0) + 1
    if _fault_counts[kind] == int(wanted.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def check_replaceable(path: Path) -> None:
    """Refuse to replace a directory that is not a Zarr store (a typo must not delete a user's folder)."""
    if path.is_dir() and not (path / "zarr.json").exists():
        raise StoreFormatError(path=path, detail="it is a directory but not a Zarr store, so it was not removed")


def check_resdiff_store(path: Path) -> None:
    """Refuse to replace anything but a resdiff store (``--overwrite`` must never delete a user's file or folder)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise StoreFormatError(path=path, detail="it is a file, not a resdiff store, so it was not removed; "
                                                 "choose another --store")
    check_replaceable(path)
    try:
        attrs = json.loads((path / "zarr.json").read_bytes()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        attrs = {}
    if not isinstance(attrs, dict) or not (FORMAT_ATTR in attrs or CREATING_ATTR in attrs):
        raise StoreFormatError(path=path, detail="it is a Zarr store that resdiff did not write, so it was not "
                                                 "removed; choose another --store")


def remove_store(path: StorePath, storage_options: dict | None = None) -> None:
    """Remove a resdiff store (refusing anything else, see :func:`check_resdiff_store`)."""
    path = normalize(path)
    if is_url(path):
        remove(path, storage_options)
        return
    check_resdiff_store(path)
    if path.exists():
        shutil.rmtree(path)


@dataclass(frozen=True)
class Completeness:
    """How far a store's capture got: the one definition of "complete" (capture, sweep, verify).

    A store is complete when every (pass, prompt) region is done, every prompt's lens
    statistics are done (stores with them), its lens parameters are saved (stores made
    with ``--save-lens``) and the capture recorded ``completed_at``.
    """

    done_pp: np.ndarray
    lens_done_p: np.ndarray | None  # None: the store has no lens statistics
    lens_saved: bool | None  # None: the store was not asked to save its lens
    finalized: bool

    @property
    def residuals_complete(self) -> bool:
        return bool(self.done_pp.all())

    @property
    def statistics_complete(self) -> bool:
        return self.lens_done_p is None or bool(self.lens_done_p.all())

    @property
    def complete(self) -> bool:
        return self.residuals_complete and self.statistics_complete and self.lens_saved is not False and self.finalized

    def missing(self, pass_names: list[str], listed: int = 20) -> list[str]:
        """What is not done yet, a line per kind (empty when complete)."""
        lines = []
        if not self.residuals_complete:
            regions = [f"{pass_names[p]}/prompt {q}" for p, q in zip(*np.nonzero(~self.done_pp), strict=True)]
            lines.append(f"{len(regions)} of {self.done_pp.size} pass x prompt regions not done (resume the capture): "
                         + ", ".join(regions[:listed]) + (" ..." if len(regions) > listed else ""))
        if not self.statistics_complete:
            lines.append(f"lens statistics of {int((~self.lens_done_p).sum())} of {self.lens_done_p.size} prompts "
                         "not done")
        if self.lens_saved is False:
            lines.append("the lens parameters (--save-lens) are not saved yet")
        if not lines and not self.finalized:
            lines.append("the capture did not record its completion (completed_at); rerun it to finish")
        return lines


def completeness(group: zarr.Group) -> Completeness:
    """The :class:`Completeness` of the store whose root group is ``group``."""
    attrs = group.attrs
    lens_done = np.asarray(group["lens_done"][...], dtype=bool) if "lens_done" in group else None
    return Completeness(
        done_pp=np.asarray(group["done"][...], dtype=bool), lens_done_p=lens_done,
        lens_saved=("saved_lens" in attrs) if "lens_weight" in group else None,
        finalized="completed_at" in attrs)


def _one_task_per_array(template: xr.Dataset) -> tuple[xr.Dataset, dict[str, tuple[int, ...]]]:
    """The template with each Dask-backed data variable as one lazy block, and the Zarr chunks it had.

    ``to_zarr(compute=False)`` builds a write task per Dask chunk even though none runs: with the
    Zarr chunks as Dask chunks, a store of 5,000 short prompts meant millions of tasks and 20 GB
    before the first forward. One block per array gives the same metadata from a graph of one task.
    """
    import dask.array as da

    chunks, blocks = {}, {}
    for name, var in template.data_vars.items():
        if isinstance(var.data, da.Array) and var.data.npartitions > 1:
            chunks[name] = tuple(int(c) for c in var.data.chunksize)
            fill = _FILLS.get(var.dtype.kind, 0)
            blocks[name] = var.copy(data=da.full(var.shape, fill, dtype=var.dtype, chunks=var.shape))
    return template.assign(blocks), chunks


_FILLS = {"f": np.nan, "i": -1, "b": False, "u": 0}


class StoreWriter:
    """Region writer for a store whose template already exists.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from store.testing import tiny_template
    >>> path = tempfile.mkdtemp() + "/s.zarr"
    >>> writer = StoreWriter.create(path, tiny_template())
    >>> writer.write_region(0, slice(0, 2), np.zeros((2, 3, 5, 8)), np.zeros((2, 5, 8)))
    >>> writer.done_pp()[0].tolist()
    [True, True, False]
    """

    def __init__(self, path: StorePath, storage_options: dict | None = None) -> None:
        self.path = normalize(path)
        self.storage_options = storage_options
        self.group = zarr.open_group(store=zarr_store(self.path, storage_options), mode="r+", use_consolidated=False)
        self._n_tokens_p: np.ndarray | None = None
        self._chunk_writers: dict[str, ChunkFiles | ShardFiles | None] = {}
        self._arrays: dict[str, zarr.Array] = {}

    @classmethod
    def create(cls, path: StorePath, template: xr.Dataset, storage_options: dict | None = None,
               codec: str = DEFAULT_CODEC) -> StoreWriter:
        """Write the template (metadata, coordinates, no data chunks) and consolidate it; the data arrays
        are compressed with ``codec`` (one of :data:`store.units.CODECS`).

        It is written under a temporary name of its own (two runs never share one) and renamed, so a
        crash never leaves a half-made store at ``path`` (the next run under the store's lock removes a
        leftover ``*.creating`` directory, see ``store.lock``).
        At an fsspec URL it is written in place, marked unfinished until the end.
        """
        path = normalize(path)
        if is_url(path):
            return cls._create_in_place(path, template, storage_options, codec)
        shard = template.attrs.get("chunking", {}).get("shard")
        template, chunks = _one_task_per_array(template)
        shards = shard_shapes(template, chunks, shard) if shard else None
        with atomic_output(path, suffix=".creating", unique=True) as staging:
            template.to_zarr(str(staging), mode="w-", compute=False,
                             encoding=encoding(template, codec, chunks, shards), consolidated=False)
            consolidate(staging)
        return cls(path)

    @classmethod
    def _create_in_place(cls, url: str, template: xr.Dataset, storage_options: dict | None,
                         codec: str) -> StoreWriter:
        remove(url, storage_options)  # the caller replaces only missing or unfinished stores
        template, chunks = _one_task_per_array(template)
        marked = template.copy(deep=False)
        marked.attrs = {k: v for k, v in template.attrs.items() if k != FORMAT_ATTR} | {CREATING_ATTR: True}
        marked.to_zarr(url, mode="w-", compute=False, encoding=encoding(marked, codec, chunks), consolidated=False,
                       **xarray_kwargs(url, storage_options))
        writer = cls(url, storage_options)
        writer.group.attrs.update({FORMAT_ATTR: template.attrs[FORMAT_ATTR]})
        del writer.group.attrs[CREATING_ATTR]
        consolidate(url, storage_options)
        return writer

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def completeness(self) -> Completeness:
        return completeness(self.group)

    def done_pp(self) -> np.ndarray:
        """The ``done(pass_, prompt)`` flags as a numpy bool array."""
        return np.asarray(self.group["done"][...], dtype=bool)

    def lens_done(self) -> np.ndarray:
        """The ``lens_done(prompt)`` flags; all True when the store has no lens statistics."""
        if "lens_done" not in self.group:
            return np.ones(self.group["done"].shape[1], dtype=bool)
        return np.asarray(self.group["lens_done"][...], dtype=bool)

    def chunk_extents(self, prompts: slice, name: str = "resid") -> list[tuple[slice, int]]:
        """Each prompt chunk of ``prompts`` (whole chunks of ``name``) with the token positions stored for it:
        up to the end of the token chunk that holds its longest prompt's last token. Token chunks past that
        hold only padding and are never written."""
        if self._n_tokens_p is None:
            self._n_tokens_p = np.asarray(self.group["n_tokens"][...])
        array = self.array(name)
        dims = array.metadata.dimension_names
        chunk_prompt, chunk_token = (array.chunks[dims.index(d)] for d in ("prompt", "token"))
        n_tokens = array.shape[dims.index("token")]
        return [(rows, token_extent(self._n_tokens_p, rows, chunk_token, n_tokens))
                for rows in chunk_slices(array.shape[dims.index("prompt")], chunk_prompt, prompts.start, prompts.stop)]

    def group_extent(self, prompts: slice) -> int:
        """Token positions a buffer for ``prompts`` must cover (the largest of its chunks' extents)."""
        return max(extent for _, extent in self.chunk_extents(prompts))

    def write_staircase(self, name: str, lead: tuple, prompts: slice, values: np.ndarray) -> list[slice]:
        """Write ``values`` into ``name`` at ``lead`` (indices of the axes before ``prompt``) and ``prompts``,
        chunk by chunk, only the token positions :meth:`chunk_extents` stores.

        ``values`` has the variable's axes except those ``lead`` indexes with an integer;
        its prompt axis covers ``prompts`` and its token axis at least the stored extent.
        Returns the prompt ranges now complete on disk: ``prompts``, or in a sharded array (format 4) the shard
        rows this write group completes (their earlier groups wait, encoded, in memory until then).
        """
        array = self.array(name)
        dims = array.metadata.dimension_names
        prompt_axis, token_axis = dims.index("prompt"), dims.index("token")
        regions = []
        for rows, extent in self.chunk_extents(prompts, name):
            where = [*lead, *(slice(None),) * (len(dims) - len(lead))]
            where[prompt_axis], where[token_axis] = rows, slice(0, extent)
            local = slice(rows.start - prompts.start, rows.stop - prompts.start)
            pick = [local if axis == prompt_axis else index for axis, index in enumerate(where)
                    if not isinstance(index, (int, np.integer))]
            regions.append((tuple(where), values[tuple(pick)]))
        direct = self._direct(name, array)
        if isinstance(direct, ShardFiles):
            direct.add(regions)
            complete = self._rows_completed(array, prompts)
            for index, _ in complete:  # a row's last write group: its shards are written, each whole, once
                direct.flush(index)
            return [rows for _, rows in complete]
        for where, part in regions:
            if direct is not None and direct.aligned(where):
                direct.write(where, part)
            else:  # zarr: another layout or codec (a sharded one reads and rewrites its shards)
                array[where] = part.astype(array.dtype, copy=False)
        return [prompts]

    @staticmethod
    def _rows_completed(array: zarr.Array, prompts: slice) -> list[tuple[int, slice]]:
        """The shard rows (index, prompt range) that end within ``prompts``: complete once it is written, as
        write groups are written in order and never cross a row's end (``store.chunking.store_groups``)."""
        axis = array.metadata.dimension_names.index("prompt")
        size, n = array.shards[axis], array.shape[axis]
        rows = [(r, slice(r * size, min((r + 1) * size, n)))
                for r in range(prompts.start // size, -(-prompts.stop // size))]
        return [(r, span) for r, span in rows if span.stop <= prompts.stop]

    def array(self, name: str) -> zarr.Array:
        """The zarr array ``name``, opened once: opening reads and parses its metadata file, which per write group
        of a store of many short prompts cost more than the writes."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def _direct(self, name: str, array: zarr.Array) -> ChunkFiles | ShardFiles | None:
        """The direct chunk or shard writer of ``name`` (:mod:`store.chunk_io`, :mod:`store.shard_io`)."""
        if name not in self._chunk_writers:
            self._chunk_writers[name] = direct_files(array)
        return self._chunk_writers[name]

    def write_region(self, pass_index: int, prompts: slice, resid_gltd: np.ndarray, final_gtd: np.ndarray) -> None:
        """Write one pass x write-group region, then flag done what is complete on disk (the group, or in a
        sharded store the shard rows it completes)."""
        self.write_staircase("resid", (pass_index,), prompts, resid_gltd)
        fault_point("region")  # a crash here leaves data without its done flag: rewritten on resume
        for rows in self.write_staircase("final", (pass_index,), prompts, final_gtd):
            self.array("done")[pass_index, rows] = True

    def write_saved_lens(self, source: int, weight_vd, bias_v, norm_weight_d, norm_bias_d) -> None:
        """Write one unembedding's parameters (``--save-lens``)."""
        self.group["lens_weight"][source] = np.asarray(weight_vd, dtype=np.float32)
        self.group["lens_bias"][source] = np.asarray(bias_v, dtype=np.float32)
        self.group["lens_norm_weight"][source] = np.asarray(norm_weight_d, dtype=np.float32)
        self.group["lens_norm_bias"][source] = np.asarray(norm_bias_d, dtype=np.float32)

    def finalize(self, attrs: dict) -> None:
        """Record closing attributes (completion time, ...) together with fresh consolidated metadata.

        zarr rewrites the root ``zarr.json`` without its consolidated metadata when attributes change, so
        a run killed between the two steps left ``completed_at`` and no consolidated metadata. Here the
        metadata is consolidated first and the attributes are then added to that same file, replaced in
        one step (a rename; one object put at a URL): a reader sees the old file or the whole new one.
        """
        consolidate(self.path, self.storage_options)
        raw = read_root_metadata(self.path, self.storage_options)
        root = json.loads(raw)
        root["attributes"] = {**root.get("attributes", {}), **attrs}
        text = json.dumps(root, indent=2).encode()
        if is_url(self.path):
            fs, where = filesystem(str(self.path), self.storage_options)
            fs.pipe_file(f"{where}/zarr.json", text)
        else:
            with atomic_output(Path(self.path) / "zarr.json", unique=True) as tmp:
                tmp.write_bytes(text)
        self.group = zarr.open_group(store=zarr_store(self.path, self.storage_options), mode="r+",
                                     use_consolidated=False)
        self._arrays.clear()

    def close(self) -> None:
        """Drop the shards still being assembled (a run that stops before a row's end: that row is not done and
        is captured again; its hidden ``.partial`` files go now rather than at the next run's start)."""
        for direct in self._chunk_writers.values():
            if isinstance(direct, ShardFiles):
                direct.discard()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def format_version(self) -> int | None:
        return self.attrs.get(FORMAT_ATTR)
