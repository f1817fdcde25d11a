"""Reading and writing whole shards of a local store directly: the capture's hot path for format 4.

A sharded array (Zarr v3 ``sharding_indexed``) stores many inner chunks in one file per
shard: the chunks' encoded bytes one after another, then an index of ``(offset, nbytes)``
per inner chunk in C order (``2**64 - 1`` twice for an absent chunk), as little-endian
uint64 followed by its crc32c. A capture writes a shard once, in order: the write groups of a
shard row (along ``prompt``) append their encoded inner chunks to a hidden ``.partial`` file
(:meth:`ShardFiles.add`), so the bytes go to the disk while later groups are computed, and
the row's last group adds the index and renames the file into place (:meth:`ShardFiles.flush`);
a shard is never read and rewritten. A run killed before a row's end loses only that row (its
``done`` flags are set after the rename, so it is computed again; the next run removes the
leftover ``.partial``). Inner chunks are encoded as :class:`~store.chunk_io.ChunkFiles`
encodes chunk files (the same codecs, the fill value's chunks left out), so zarr and
tensorstore read these shards as their own (tested).

Reading any region reads each touched shard's index once (kept while the file is
unchanged) and then only the inner chunks it needs, decoded on the chunk threads.
A damaged index or inner chunk raises :class:`~store.errors.CorruptChunk` naming the
shard and the inner chunk.

Axes of the bookkeeping arrays: ``index_n2`` is (inner chunk in C order, offset/nbytes).
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np
import zarr

from store.chunk_io import WRITE_THREADS, ChunkFiles, _codecs, _crc32c, _threads
from store.errors import CorruptChunk

EMPTY = np.uint64(2**64 - 1)
# Encode tasks of one region queued or holding their bytes at once: enough to keep every chunk thread busy
# while the caller appends, few enough that a region's encoded bytes never sit in memory together.
ENCODE_WINDOW = 2 * WRITE_THREADS


def _index_codecs_ok(codec) -> bool:
    """Whether the shard index is what this module reads: little-endian bytes then crc32c, at the end."""
    index = list(codec.index_codecs)
    return (len(index) == 2 and isinstance(index[0], zarr.codecs.BytesCodec)
            and (index[0].endian is None or index[0].endian.value == "little")
            and isinstance(index[1], zarr.codecs.Crc32cCodec) and codec.index_location.value == "end")


class ShardFiles:
    """Direct whole-shard writes and region reads for one sharded array of a local store.

    Build with :meth:`for_array`, which returns None where zarr must write (and read) instead.
    """

    def __init__(self, directory: Path, array: zarr.Array, inner: ChunkFiles) -> None:
        self.directory, self.inner, self.name = directory, inner, inner.name
        self.shape, self.chunks, self.shards = array.shape, array.chunks, array.shards
        self.per_shard = tuple(s // c for s, c in zip(self.shards, self.chunks, strict=True))
        self.n_inner = int(np.prod(self.per_shard, dtype=np.int64))
        self._strides = [int(np.prod(self.per_shard[axis + 1:], dtype=np.int64)) for axis in range(len(self.shape))]
        self.index_size = 16 * self.n_inner + 4
        self.encode_key = array.metadata.encode_chunk_key  # keys of the shard grid
        self.prompt_axis = tuple(array.metadata.dimension_names or ()).index("prompt") \
            if "prompt" in (array.metadata.dimension_names or ()) else 0
        self._indexes: dict[tuple, tuple[tuple, np.ndarray | None]] = {}
        self._pending: dict[tuple, _Assembling] = {}  # shards being written: their partial files and indexes

    @classmethod
    def for_array(cls, array: zarr.Array) -> ShardFiles | None:
        store, meta = array.store_path.store, array.metadata
        if not isinstance(store, zarr.storage.LocalStore) or meta.zarr_format != 3 or array.shards is None:
            return None
        if not isinstance(meta.chunk_key_encoding, zarr.core.chunk_key_encodings.DefaultChunkKeyEncoding):
            return None
        sharding = meta.codecs[0]
        if len(meta.codecs) != 1 or not isinstance(sharding, zarr.codecs.ShardingCodec) \
                or not _index_codecs_ok(sharding):
            return None
        codecs = _codecs(sharding.codecs)
        if codecs is None or np.dtype(array.dtype).kind not in "fiub":
            return None
        directory = Path(store.root) / array.store_path.path
        return cls(directory, array, ChunkFiles(directory, array, *codecs))

    # -- layout --------------------------------------------------------------------------------------

    def shard_of(self, coords: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
        """The shard holding inner chunk ``coords`` and the chunk's place in that shard's index."""
        shard = tuple(c // n for c, n in zip(coords, self.per_shard, strict=True))
        flat = sum(c % n * stride for c, n, stride in zip(coords, self.per_shard, self._strides, strict=True))
        return shard, flat

    # -- reading -------------------------------------------------------------------------------------

    def shard_index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        """The ``index_n2`` of a shard (None: no file, every chunk is the fill value); CorruptChunk when its
        checksum fails or an entry points outside the file. Kept while the file is unchanged."""
        key = self.encode_key(shard)
        path = self.directory / key
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._indexes.get(shard)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(path, "rb") as f:
            if stat.st_size < self.index_size:
                raise self._corrupt(key, "the file is shorter than its shard index")
            f.seek(stat.st_size - self.index_size)
            raw = f.read(self.index_size)
        if _crc32c(memoryview(raw)[:-4]) != raw[-4:]:
            raise self._corrupt(key, "its shard index checksum does not match its bytes")
        index_n2 = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.n_inner, 2)
        stored = index_n2[:, 0] != EMPTY
        ends = index_n2[stored, 0] + index_n2[stored, 1]
        if stored.any() and int(ends.max()) > stat.st_size - self.index_size:
            raise self._corrupt(key, "its shard index points past the file's end")
        self._indexes[shard] = (stamp, index_n2)
        return index_n2

    def _corrupt(self, key: str, reason: str) -> CorruptChunk:
        return CorruptChunk(path=self.directory.parent, key=key, array=self.name, reason=reason)

    def stored_chunks(self, shard: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The inner chunk coordinates a shard's file holds."""
        index_n2 = self.shard_index(shard)
        if index_n2 is None:
            return []
        base = tuple(s * n for s, n in zip(shard, self.per_shard, strict=True))
        local_cn = np.stack(np.unravel_index(np.flatnonzero(index_n2[:, 0] != EMPTY), self.per_shard), axis=1)
        return [tuple(int(v) for v in row) for row in local_cn + np.asarray(base, dtype=np.int64)]

    def decode_shard(self, shard: tuple[int, ...]) -> int:
        """Decode every inner chunk of a shard (its checksums included); the number of chunks decoded."""
        key = self.encode_key(shard)
        index_n2 = self.shard_index(shard)
        if index_n2 is None:
            return 0
        data = (self.directory / key).read_bytes()
        stored = np.flatnonzero(index_n2[:, 0] != EMPTY)
        for flat in stored:
            offset, nbytes = (int(v) for v in index_n2[flat])
            self.inner.decode(data[offset:offset + nbytes], f"{key} (inner chunk {flat})")
        return len(stored)

    def _get(self, fd: int, key: str, entry: tuple[int, int] | None, out: np.ndarray, inside: tuple,
             flat: int) -> None:
        if entry is None:
            out.fill(self.inner.fill)
            return
        offset, nbytes = entry
        data = os.pread(fd, nbytes, offset)
        if len(data) != nbytes:
            raise self._corrupt(key, f"inner chunk {flat} is cut short")
        out[...] = self.inner.decode(data, f"{key} (inner chunk {flat})")[inside]

    def readable(self, where: tuple) -> bool:
        return self.inner.readable(where)

    def read(self, where: tuple) -> np.ndarray:
        """The region ``where`` (slices of step 1, one per axis), read inner chunk by inner chunk."""
        axes = self.inner._pieces(where)
        out = np.empty(tuple(pieces[-1][1].stop if pieces else 0 for pieces in axes), self.inner.dtype)
        fds: dict[tuple, int] = {}
        indexes: dict[tuple, np.ndarray | None] = {}  # each touched shard's index, looked up once per read
        jobs = []
        try:
            for combo in product(*axes):
                shard, flat = self.shard_of(tuple(c for c, _, _ in combo))
                if shard not in indexes:
                    indexes[shard] = self.shard_index(shard)
                index_n2 = indexes[shard]
                entry = None
                if index_n2 is not None and index_n2[flat, 0] != EMPTY:
                    entry = (int(index_n2[flat, 0]), int(index_n2[flat, 1]))
                    if shard not in fds:
                        fds[shard] = os.open(self.directory / self.encode_key(shard), os.O_RDONLY)
                jobs.append(_threads().submit(self._get, fds.get(shard, -1), self.encode_key(shard), entry,
                                              out[tuple(o for _, o, _ in combo)], tuple(i for _, _, i in combo),
                                              flat))
            for job in jobs:
                job.result()
        finally:
            _settle(jobs)  # no thread may read an fd closed below
            for fd in fds.values():
                os.close(fd)
        return out

    # -- writing -------------------------------------------------------------------------------------

    def add(self, regions: list[tuple[tuple, np.ndarray]]) -> None:
        """Encode the inner chunks of ``regions`` (``(where, values)`` as for ``ChunkFiles.write``, chunk-aligned)
        on the chunk threads and append them to their shards' files being assembled (hidden ``.partial`` files
        that :meth:`flush` completes with their index and renames). An inner chunk equal to the fill value is
        left out (and replaces one added before).

        At most :data:`ENCODE_WINDOW` tasks are queued or held at once and each task's bytes are dropped once
        appended, so the encoded bytes alive are a few tasks' worth, not the region's."""
        blocks = [(combo, where, values) for where, values in regions for combo in product(*self.inner._pieces(where))]
        step = max(1, -(-len(blocks) // (4 * WRITE_THREADS)))  # a few tasks per thread: encodes run in parallel
        tasks = iter(range(0, len(blocks), step))
        jobs: deque = deque()
        try:
            for start in tasks:
                jobs.append(_threads().submit(self._encode_blocks, blocks[start:start + step]))
                if len(jobs) >= ENCODE_WINDOW:
                    self._append_all(jobs.popleft().result())
            while jobs:
                self._append_all(jobs.popleft().result())
        finally:
            _settle(list(jobs))  # on a failure, no encode may still run when the caller moves on

    def _append_all(self, encoded: list[tuple[tuple, int, tuple[bytes, ...] | None]]) -> None:
        for shard, flat, parts in encoded:
            self._append(shard, flat, parts)

    def _encode_blocks(self, blocks: list[tuple]) -> list[tuple[tuple, int, tuple[bytes, ...] | None]]:
        """(shard, place in its index, stored bytes in pieces or None) of inner chunks given as (pieces, region,
        values): a task encodes many (a chunk of a short prompt is a few KB: a task each cost more than its
        encoding)."""
        out = []
        for combo, where, values in blocks:
            block = values[tuple(s for _, s, _ in combo if s is not None)]
            int_axes = tuple(axis for axis, index in enumerate(where) if not isinstance(index, slice))
            if int_axes:
                block = np.expand_dims(block, int_axes)
            out.append((*self.shard_of(tuple(c for c, _, _ in combo)), self.inner.encode_parts(block)))
        return out

    def _append(self, shard: tuple[int, ...], flat: int, parts: tuple[bytes, ...] | None) -> None:
        """Write one encoded inner chunk at the end of its shard's file being assembled (the page cache takes
        it now, so a row's bytes reach the disk while its later groups are computed, not all at its end)."""
        assembling = self._pending.get(shard)
        if assembling is None:
            path = self.directory / self.encode_key(shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
            assembling = self._pending[shard] = _Assembling(partial, os.open(partial, _CREATE, 0o644))
        if parts is None:
            assembling.index.pop(flat, None)
            return
        offset = size = assembling.size
        for part in parts:
            _write_all(assembling.fd, part, size)
            size += len(part)
        assembling.index[flat] = (offset, size - offset)
        assembling.size = size

    def flush(self, prompt_row: int | None = None) -> None:
        """Complete the shards assembled so far (those of shard row ``prompt_row`` along ``prompt``, or all): each
        gets its index and replaces its file whole, holding exactly the inner chunks added (none: removed)."""
        shards = [s for s in self._pending if prompt_row is None or s[self.prompt_axis] == prompt_row]
        for shard in shards:
            self._put_shard(shard, self._pending.pop(shard))

    def discard(self) -> None:
        """Drop the shards being assembled (their ``.partial`` files), as a failed or abandoned write must."""
        for assembling in self._pending.values():
            os.close(assembling.fd)
            assembling.partial.unlink(missing_ok=True)
        self._pending.clear()

    def _put_shard(self, shard: tuple[int, ...], assembling: _Assembling) -> None:
        path = self.directory / self.encode_key(shard)
        try:
            if not assembling.index:
                path.unlink(missing_ok=True)
                return
            index_n2 = np.full((self.n_inner, 2), EMPTY, dtype="<u8")
            for flat, entry in assembling.index.items():
                index_n2[flat] = entry
            index = index_n2.tobytes()
            _write_all(assembling.fd, index + _crc32c(index), assembling.size)
            os.replace(assembling.partial, path)
        finally:
            os.close(assembling.fd)
            assembling.partial.unlink(missing_ok=True)
        self._indexes.pop(shard, None)


def _settle(jobs: list) -> None:
    """Cancel the jobs not started and wait for the rest (their errors are the caller's to have raised)."""
    for job in jobs:
        job.cancel()
    for job in jobs:
        if not job.cancelled():
            job.exception()


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (one ``pwrite`` may take fewer bytes than given)."""
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


@dataclass
class _Assembling:
    """A shard being written: its hidden file, an open descriptor, the bytes written and where each inner chunk
    (by its place in the index) lies."""

    partial: Path
    fd: int
    size: int = 0
    index: dict[int, tuple[int, int]] = field(default_factory=dict)


def direct_files(array: zarr.Array) -> ChunkFiles | ShardFiles | None:
    """The direct reader and writer of ``array``: chunk files, whole shards, or None (zarr's own path)."""
    if array.shards is not None:
        return ShardFiles.for_array(array)
    return ChunkFiles.for_array(array)
