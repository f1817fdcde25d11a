"""Writing and reading whole chunks of a local store directly, in parallel: the capture's hot path.

zarr-python spends ~1-2 ms of Python per chunk on a write (indexing, an event loop, a thread
hand-off per codec, an atomic rename), about as much as encoding and writing a 400 KB chunk
costs, and it holds the GIL for it while the forwards run. A capture only ever writes whole,
chunk-aligned regions of arrays whose codecs are the Zarr v3 ``bytes`` codec (little endian)
and at most one Blosc or Zstd compressor, so such a region is cut into chunks here, each
encoded (numcodecs, which releases the GIL) and written to its chunk file (atomically: a
temporary file renamed into place) by a pool of threads sized to the cores. The bytes are
the Zarr v3 chunk encoding of those codecs, so zarr reads them back as its own (tested against
zarr's own writes). Anything else (fsspec URLs, other codecs, unaligned regions) is written by
zarr as before. As zarr does, a chunk holding only the fill value is not written (and a stale
file of it removed), which is how padding-only chunks stay absent from a store.

Reading is the mirror image, for analysis over many small chunks of a ragged store: any
region is read file by file and decoded on the same threads (each chunk it touches whole;
an absent chunk is the fill value), at a fraction of zarr's cost per chunk.
"""

from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np
import zarr

from store.errors import CorruptChunk

WRITE_THREADS = max(2, min(8, os.cpu_count() or 2))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="resdiff-chunk")
        return _pool


def _forget_pool_in_child() -> None:
    # A forked child (a DataLoader worker, say) inherits the pool object but none of its threads:
    # work submitted to it would wait forever. The child starts its own on first use.
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_in_child)


def _codecs(codecs) -> tuple[object | None, bool] | None:
    """(the numcodecs compressor equal to ``codecs`` after the bytes codec or None, whether a crc32c checksum
    follows it); None when the codecs are not ones this module writes."""
    import numcodecs

    if not isinstance(codecs[0], zarr.codecs.BytesCodec) or (codecs[0].endian and codecs[0].endian.value != "little"):
        return None
    rest = list(codecs[1:])
    checksum = bool(rest) and isinstance(rest[-1], zarr.codecs.Crc32cCodec)
    rest = rest[:-1] if checksum else rest
    if not rest:
        return None, checksum
    if len(rest) > 1:
        return None
    codec = rest[0]
    if isinstance(codec, zarr.codecs.ZstdCodec):
        return numcodecs.Zstd(level=codec.level, checksum=codec.checksum), checksum
    if isinstance(codec, zarr.codecs.BloscCodec):
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[codec.shuffle.value]
        return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle,
                               blocksize=codec.blocksize), checksum
    return None


def _crc32c(data) -> bytes:
    """The crc32c of a bytes object or array's bytes, as the 4 little-endian bytes the Zarr codec appends."""
    import google_crc32c

    if not isinstance(data, bytes):  # it takes bytes or a numpy array, not a memoryview
        data = np.frombuffer(data, dtype=np.uint8)
    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


class ChunkFiles:
    """Direct chunk writes (and reads) for one array of a local store (see the module docstring).

    Build with :meth:`for_array`, which returns None where zarr must write (and read) instead.
    """

    def __init__(self, directory: Path, array: zarr.Array, compressor, checksum: bool) -> None:
        self.directory, self.compressor, self.checksum = directory, compressor, checksum
        self.name = array.store_path.path
        self.shape, self.chunks = array.shape, array.chunks
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill = array.metadata.fill_value
        self.encode_key = array.metadata.encode_chunk_key

    @classmethod
    def for_array(cls, array: zarr.Array) -> ChunkFiles | None:
        store = array.store_path.store
        meta = array.metadata
        if not isinstance(store, zarr.storage.LocalStore) or meta.zarr_format != 3 or array.shards is not None:
            return None
        if not isinstance(meta.chunk_key_encoding, zarr.core.chunk_key_encodings.DefaultChunkKeyEncoding):
            return None
        codecs = _codecs(meta.codecs)
        if codecs is None or np.dtype(array.dtype).kind not in "fiub":
            return None
        return cls(Path(store.root) / array.store_path.path, array, *codecs)

    def aligned(self, where: tuple) -> bool:
        """Whether ``where`` (ints and slices, one per axis) covers whole chunks only."""
        for index, size, chunk in zip(where, self.shape, self.chunks, strict=True):
            if isinstance(index, slice):
                start, stop = index.start or 0, size if index.stop is None else index.stop
                if start % chunk or (stop % chunk and stop != size) or index.step not in (None, 1):
                    return False
            elif chunk != 1:
                return False
        return True

    def _is_fill(self, block: np.ndarray) -> bool:
        if self.dtype.kind == "f" and np.isnan(self.fill):
            # fmax skips NaN, so its reduction is NaN only when every value is: no chunk-sized mask
            return bool(block.size == 0 or np.isnan(np.fmax.reduce(block, axis=None)))
        return bool((block == self.fill).all())

    def encode(self, block: np.ndarray) -> bytes | None:
        """A chunk's stored bytes (compressed, then its checksum where the codecs say so); None when it holds
        only the fill value (such a chunk is not stored)."""
        parts = self.encode_parts(block)
        return None if parts is None else b"".join(parts)

    def encode_parts(self, block: np.ndarray) -> tuple[bytes, ...] | None:
        """:meth:`encode`'s bytes as the pieces to write one after the other (the data, then its checksum),
        without a copy of the chunk to join them."""
        if self._is_fill(block):
            return None
        if block.shape != self.chunks:  # an edge chunk is stored at full size, filled past the array's end
            full = np.full(self.chunks, self.fill, dtype=self.dtype)
            full[tuple(slice(0, s) for s in block.shape)] = block
            block = full
        data = np.ascontiguousarray(block, dtype=self.dtype)
        # An array, not bytes, goes to the compressor: Blosc takes its element size from it, as zarr's does.
        data = data.tobytes() if self.compressor is None else bytes(self.compressor.encode(data))
        # the Zarr v3 crc32c codec: the checksum of the encoded bytes, appended
        return (data, _crc32c(data)) if self.checksum else (data,)

    def _put(self, coords: tuple[int, ...], block: np.ndarray) -> None:
        path = self.directory / self.encode_key(coords)
        data = self.encode(block)
        if data is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, path)

    def decode(self, data: bytes, key: str) -> np.ndarray:
        """The chunk stored as ``data`` at ``key``; :class:`~store.errors.CorruptChunk` when its checksum
        fails or it does not decode to a whole chunk."""
        if self.checksum:
            data = memoryview(data)  # slices without copies
            if len(data) < 4 or _crc32c(data[:-4]) != data[-4:]:
                raise CorruptChunk(path=self.directory.parent, key=key, array=self.name,
                                   reason="its crc32c checksum does not match its bytes")
            data = data[:-4]
        try:
            if self.compressor is not None:
                data = self.compressor.decode(data)
            return np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)
        except Exception as exc:  # a codec's own error (Blosc, Zstd) or a wrong size: the bytes are damaged
            reason = f"it does not decode: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            raise CorruptChunk(path=self.directory.parent, key=key, array=self.name, reason=reason) from None

    def _get(self, coords: tuple[int, ...], out: np.ndarray, inside: tuple) -> None:
        key = self.encode_key(coords)
        try:
            data = (self.directory / key).read_bytes()
        except FileNotFoundError:  # never written: the fill value, as zarr reads it
            out.fill(self.fill)
            return
        out[...] = self.decode(data, key)[inside]

    def _pieces(self, where: tuple) -> list[list[tuple]]:
        """Per axis of a region: (chunk coordinate, slice of the region, slice of the chunk) for each chunk it
        crosses, or one (index, None, None) for an int axis (which only a chunk of 1 along it allows)."""
        axes = []
        for index, size, chunk in zip(where, self.shape, self.chunks, strict=True):
            if isinstance(index, slice):
                start, stop, _ = index.indices(size)
                pieces = []
                for c in range(start // chunk, -(-stop // chunk) if stop > start else start // chunk):
                    lo, hi = max(start, c * chunk), min(stop, (c + 1) * chunk)
                    pieces.append((c, slice(lo - start, hi - start), slice(lo - c * chunk, hi - c * chunk)))
                axes.append(pieces)
            else:
                axes.append([(int(index), None, None)])
        return axes

    def readable(self, where: tuple) -> bool:
        """Whether :meth:`read` takes ``where``: a slice of step 1 per axis."""
        return len(where) == len(self.shape) and all(
            isinstance(index, slice) and index.step in (None, 1) for index in where)

    def read(self, where: tuple) -> np.ndarray:
        """The region ``where`` (slices of step 1, one per axis, aligned or not), read chunk by chunk on the
        threads; each chunk it touches is decoded whole, as zarr does."""
        axes = self._pieces(where)
        out = np.empty(tuple(pieces[-1][1].stop if pieces else 0 for pieces in axes), self.dtype)
        jobs = [_threads().submit(self._get, tuple(c for c, _, _ in combo), out[tuple(o for _, o, _ in combo)],
                                  tuple(i for _, _, i in combo)) for combo in product(*axes)]
        for job in jobs:
            job.result()
        return out

    def write(self, where: tuple, values: np.ndarray) -> None:
        """Write ``values`` (the shape of ``where``'s slices, int axes dropped) into the aligned region
        ``where``, chunk by chunk on the writer threads; returns when every chunk is written."""
        int_axes = tuple(axis for axis, index in enumerate(where) if not isinstance(index, slice))
        jobs = []
        for combo in product(*self._pieces(where)):
            coords = tuple(c for c, _, _ in combo)
            block = np.expand_dims(values[tuple(s for _, s, _ in combo if s is not None)], int_axes)
            jobs.append(_threads().submit(self._put, coords, block))
        for job in jobs:
            job.result()
