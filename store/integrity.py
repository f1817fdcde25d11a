"""Chunk integrity of a local store: every chunk that must exist does, and every chunk decodes.

A chunk must exist where its (prompt, token) block holds a real position and its region is
complete: ``done`` for ``resid`` and ``final``, ``lens_done`` for the lens statistics, always
for the per-token labels and lengths. (Arrays whose real values may all equal the fill value,
such as the rise and fall ids of two identical passes, are only checked where a chunk exists.)
A chunk decodes when its crc32c checksum (format 3) matches and its codecs turn it back into
a whole chunk. ``deep`` decodes every chunk file; otherwise each array is sampled.

Chunk keys are named as on disk (``resid/c/0/3/0/1/0``); in a sharded array (format 4) a file is a
shard and a missing chunk is named by its inner chunk coordinates (``inner chunk 0/3/0/1/0``). Hidden
files in an array's folder (``.c.*.partial``, left by a write that the file system refused) are not chunks: they are
listed as leftovers the next capture removes, never counted as problems.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from store.chunk_io import ChunkFiles
from store.chunking import real_blocks
from store.errors import CorruptChunk
from store.shard_io import ShardFiles, direct_files

SAMPLE = 32  # chunk files decoded per array without --deep (all of them for arrays with fewer)

# Arrays whose chunks must exist where their region is real and complete, by the flag that says so.
_BY_DONE = ("resid", "final")
_BY_LENS_DONE = ("entropy", "lse", "topk_id", "topk_logit", "tracked_logit", "kl")
_ALWAYS = ("token_id", "token_position", "n_tokens", "prompt_length")


def chunk_files_in(directory: Path) -> list[Path]:
    """The chunk files of the array at ``directory`` (hidden ``.partial`` leftovers are not chunks)."""
    root = directory / "c"
    return sorted(f for f in root.rglob("*") if f.is_file() and not f.name.startswith(".")) if root.is_dir() else []


def _decode(array: zarr.Array, direct: ChunkFiles | ShardFiles | None, path: Path, key: str) -> None:
    coords = tuple(int(c) for c in key.split("/")[1:])
    if isinstance(direct, ShardFiles):
        direct.decode_shard(coords)
        return
    if direct is not None:
        direct.decode(path.read_bytes(), key)
        return
    size = array.shards or array.chunks  # the grid of the files: shards where the array is sharded
    try:
        array[tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, size, strict=True))]
    except Exception as exc:  # zarr's checksum ValueError, a codec's error: the bytes are damaged
        raise CorruptChunk(path=path.parents[len(coords) + 1], key=key, array=array.basename,
                           reason=str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__) from None


def corrupt_chunks(root: Path, deep: bool, seed: int = 0) -> list[str]:
    """One line per chunk (or shard) file that fails a checksum or does not decode (all files with ``deep``,
    else :data:`SAMPLE` per array); a shard is decoded whole, its index and every inner chunk."""
    group = zarr.open_group(str(root), mode="r", use_consolidated=False)
    rng = np.random.default_rng(seed)
    problems = []
    for name, array in sorted(group.arrays()):
        files = chunk_files_in(root / name)
        if not deep and len(files) > SAMPLE:
            files = [files[i] for i in sorted(rng.choice(len(files), SAMPLE, replace=False))]
        direct = direct_files(array)
        for file in files:
            key = file.relative_to(root / name).as_posix()
            try:
                _decode(array, direct, file, key)
            except CorruptChunk as exc:
                problems.append(f"{name}: chunk {key} is corrupt ({exc.fields.get('reason', exc)})")
    return problems


def stored_chunks(root: Path, name: str, array: zarr.Array) -> list[tuple[int, ...]]:
    """The chunk coordinates stored for array ``name``: its chunk files, or in a sharded array the inner
    chunks its shards' indexes list (a shard whose index is damaged counts as holding nothing here;
    :func:`corrupt_chunks` names it)."""
    direct = direct_files(array)
    keys = [tuple(int(c) for c in f.relative_to(root / name).parts[1:]) for f in chunk_files_in(root / name)]
    if array.shards is None:
        return keys
    if not isinstance(direct, ShardFiles):
        return []
    stored = []
    for shard in keys:
        try:
            stored.extend(direct.stored_chunks(shard))
        except CorruptChunk:
            continue
    return stored


def _complete_rows(name: str, dims: tuple[str, ...], flags: dict[str, np.ndarray]) -> np.ndarray | None:
    """(leading index..., prompt) booleans of complete regions for ``name``; None when it is not checked."""
    if name in _BY_DONE:
        return flags["done"]
    if name in _BY_LENS_DONE and "lens_done" in flags:
        lead = [1] * dims.index("prompt")
        return np.broadcast_to(flags["lens_done"], (*lead, flags["lens_done"].size))
    if name in _ALWAYS:
        return np.ones((*[1] * dims.index("prompt"), flags["n_tokens"].size), dtype=bool)
    return None


def missing_chunks(root: Path) -> list[str]:
    """One line per array with chunks that a complete region needs but that are absent (deleted files read
    as padding, so without this check they would pass for padding)."""
    group = zarr.open_group(str(root), mode="r", use_consolidated=False)
    flags = {name: np.asarray(group[name][...]) for name in ("done", "lens_done", "n_tokens") if name in group}
    problems = []
    for name, array in sorted(group.arrays()):
        dims = tuple(array.metadata.dimension_names or ())
        complete = _complete_rows(name, dims, flags) if "prompt" in dims else None
        if complete is None:
            continue
        p_axis = dims.index("prompt")
        present = set(stored_chunks(root, name, array)).__contains__
        chunks, grid = array.chunks, tuple(-(-s // c) for s, c in zip(array.shape, array.chunks, strict=True))
        if "token" in dims:
            t_axis = dims.index("token")
            real = real_blocks(flags["n_tokens"], chunks[p_axis], chunks[t_axis], array.shape[t_axis])
        missing = []
        for coords in np.ndindex(*grid):
            rows = slice(coords[p_axis] * chunks[p_axis], (coords[p_axis] + 1) * chunks[p_axis])
            if "token" in dims and not real[coords[p_axis], coords[t_axis]]:
                continue
            lead = tuple(min(c, n - 1) for c, n in zip(coords[:p_axis], complete.shape[:-1], strict=True))
            if not complete[(*lead, rows)].all():
                continue
            if not present(coords):
                missing.append(array.metadata.encode_chunk_key(coords) if array.shards is None
                               else "inner chunk " + "/".join(map(str, coords)))
        if missing:
            problems.append(f"{name}: {len(missing)} chunk(s) of complete regions are missing (e.g. {missing[0]}); "
                            "they would read as padding")
    return problems


def leftover_partials(root: Path) -> list[Path]:
    """Temporary chunk files (``.NAME.HEX.partial``) a refused or killed write left in the store."""
    return [f for f in root.rglob(".*.partial") if f.is_file()]
