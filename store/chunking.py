"""How a store is cut into chunks, and which chunks hold only padding.

Axes: prompt (in store order, longest first), layer, token. A ``resid`` chunk is
``(1, prompt, layer, token, dim)``: one pass, a tile of prompts x layers x token
positions, and all dims. Prompts are laid out longest first, so in every prompt chunk
the first prompt is the longest and the real positions form a staircase; a token chunk
past a prompt chunk's longest prompt holds only padding. Such chunks are never
written, and readers (``store.reader.open_store``) never read them.

Choosing a chunk for a ragged prompt set (:func:`choose_chunking`): for each token
chunk size ``t`` (powers of two from 8, and the longest prompt), the prompt x layer
budget ``16 MiB / (t x dim x itemsize)`` is split as squarely as the sizes allow; then
the prompt tile shrinks (by an eighth at a time) until the bytes of the chunks that hold real tokens are at
most :data:`MAX_WASTE` times the bytes of the real tokens (or it is 1). Among the sizes
that meet the bound, the one with the fewest chunks wins (then the smallest waste).
A store whose padded pass fits one target chunk is one chunk per pass (its padding costs
less than more chunks would). For prompts of one length the rule usually gives whole
prompts in a chunk, the square tiles of format 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TARGET_CHUNK_BYTES = 16 * 2**20
SHARD_TARGET_BYTES = 256 * 2**20  # one array's shard row before compression (format 4), assembled in memory
MAX_WASTE = 1.1  # stored bytes (chunks with real tokens) / real-token bytes
MIN_TOKEN_CHUNK = 8


@dataclass(frozen=True)
class Chunking:
    """Chunk sizes along prompt, layer and token (``None``: all tokens in a chunk); pass_ is 1, dim whole.
    ``shard``: prompts per shard (format 4; a multiple of ``prompt``), None for unsharded stores."""

    prompt: int
    layer: int
    token: int | None = None
    shard: int | None = None


def _square_tile(n_prompts: int, n_layers1: int, budget: int) -> tuple[int, int]:
    layer = min(n_layers1, max(1, math.isqrt(budget)))
    prompt = min(n_prompts, max(1, budget // layer))
    if prompt == n_prompts:
        layer = min(n_layers1, max(layer, budget // prompt))
    return prompt, layer


def stored_cells(lengths_desc: np.ndarray, chunk_prompt: int, chunk_token: int) -> int:
    """(prompt, token) cells in the chunks that hold real tokens, for lengths sorted longest first."""
    firsts = lengths_desc[::chunk_prompt]
    counts = np.minimum(chunk_prompt, len(lengths_desc) - np.arange(0, len(lengths_desc), chunk_prompt))
    return int((counts * (-(-firsts // chunk_token)) * chunk_token).sum())


def choose_chunking(
    lengths: list[int] | np.ndarray, n_layers1: int, hidden: int, itemsize: int,
    target_bytes: int = TARGET_CHUNK_BYTES, small_store_one_chunk: bool = True,
) -> Chunking:
    """The chunking of a store of prompts with these token ``lengths`` (see the module docstring).

    >>> choose_chunking([128] * 1000, 29, 1536, 2)  # one length: whole prompts, square tiles
    Chunking(prompt=7, layer=6, token=128, shard=None)
    >>> choose_chunking([600, 300, 120, 80] + [40] * 96, 31, 576, 2)
    Chunking(prompt=2, layer=31, token=8, shard=None)
    """
    lengths_desc = np.sort(np.asarray(lengths, dtype=np.int64))[::-1]
    n_prompts, longest, real = len(lengths_desc), int(lengths_desc[0]), int(lengths_desc.sum())
    if small_store_one_chunk and n_prompts * n_layers1 * longest * hidden * itemsize <= target_bytes:
        return Chunking(prompt=n_prompts, layer=n_layers1, token=longest)  # padding costs less than more chunks
    sizes = sorted({*(MIN_TOKEN_CHUNK << k for k in range(32) if MIN_TOKEN_CHUNK << k < longest), longest})
    best = None
    for token in sizes:
        budget = max(1, target_bytes // (token * hidden * itemsize))
        prompt, layer = _square_tile(n_prompts, n_layers1, budget)
        while prompt > 1 and stored_cells(lengths_desc, prompt, token) > MAX_WASTE * real:
            prompt -= max(1, prompt // 8)
        layer = min(n_layers1, max(layer, budget // prompt))
        waste = stored_cells(lengths_desc, prompt, token) / real
        n_chunks = stored_cells(lengths_desc, prompt, token) // (prompt * token) * -(-n_layers1 // layer)
        key = (waste > MAX_WASTE, n_chunks if waste <= MAX_WASTE else waste, waste)
        if best is None or key < best[0]:
            best = (key, Chunking(prompt=prompt, layer=layer, token=token))
    return best[1]


def shard_prompts(lengths_desc: list[int] | np.ndarray, chunking: Chunking, bytes_per_position: int,
                  target_bytes: int | None = None) -> int:
    """Prompts per shard: whole prompt chunks, as many as keep the largest shard row of one array within
    ``target_bytes`` (default :data:`SHARD_TARGET_BYTES`) before compression: the (prompt, token) cells of its
    chunks that hold real tokens (padding-only chunks are never stored) x ``bytes_per_position``. Prompts are
    longest first, so the first row is the largest. Every array of a store is sharded along ``prompt`` alike; a
    shard row is written once, whole, when its last write group is.

    >>> shard_prompts([100] * 50 + [10] * 50, Chunking(prompt=4, layer=3, token=8), 2**16, 2**24)
    4
    >>> shard_prompts([10] * 99, Chunking(prompt=4, layer=3, token=8), 2**10, 2**24)  # all: 25 chunks
    100
    """
    lengths_desc = np.sort(np.asarray(lengths_desc, dtype=np.int64))[::-1]
    target, cp = target_bytes or SHARD_TARGET_BYTES, chunking.prompt
    token = chunking.token or int(lengths_desc[0])

    def row_bytes(n_chunks: int) -> int:
        return stored_cells(lengths_desc[:n_chunks * cp], cp, token) * max(1, bytes_per_position)

    low, high = 1, -(-len(lengths_desc) // cp)  # in prompt chunks: the largest row within target (at least one)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if row_bytes(middle) <= target else (low, middle - 1)
    return int(low * cp)


def shard_rows(n_prompts: int, chunking: dict) -> list[slice]:
    """The prompt ranges of a store's shard rows (format 4); one row per prompt chunk in an unsharded store."""
    return chunk_slices(n_prompts, int(chunking.get("shard") or chunking["prompt"]))


def store_groups(lengths_desc: list[int], chunking: dict, batch_size: int, batch_tokens: int) -> list[slice]:
    """The write groups of a store whose attributes record ``chunking``: :func:`write_groups` within each shard
    row (format 4: no group crosses a row's end, so a row is complete when its last group is written), else over
    the whole store (stores of earlier formats, resumed)."""
    if not chunking.get("shard"):
        return write_groups(lengths_desc, int(chunking["prompt"]), batch_size, batch_tokens)
    groups = []
    for row in shard_rows(len(lengths_desc), chunking):
        inside = write_groups(lengths_desc[row], int(chunking["prompt"]), batch_size, batch_tokens)
        groups += [slice(g.start + row.start, g.stop + row.start) for g in inside]
    return groups


def write_groups(lengths_desc: list[int], chunk_prompt: int, batch_size: int, batch_tokens: int) -> list[slice]:
    """Prompt ranges written at once: whole prompt chunks, with room for at least one full compute batch.

    A group grows chunk by chunk until it holds ``batch_size`` prompts or ``batch_tokens``
    padded tokens (its longest prompt times its prompts), so batches are rarely cut short.

    >>> write_groups([50, 40, 30, 20, 10], 2, batch_size=8, batch_tokens=100)
    [slice(0, 2, None), slice(2, 5, None)]
    """
    groups, start, n = [], 0, len(lengths_desc)
    while start < n:
        stop = min(start + chunk_prompt, n)
        while stop < n and stop - start < batch_size and (stop - start) * lengths_desc[start] < batch_tokens:
            stop = min(stop + chunk_prompt, n)
        groups.append(slice(start, stop))
        start = stop
    return groups


def token_extent(lengths: np.ndarray, rows: slice, chunk_token: int | None, n_tokens: int) -> int:
    """How many token positions of the rows ``rows`` (one prompt chunk) are stored: the chunks that hold
    their longest prompt's tokens, never past the token dimension."""
    longest = int(np.max(lengths[rows]))
    if not chunk_token:
        return n_tokens
    return min(n_tokens, -(-longest // chunk_token) * chunk_token)


def chunk_slices(n: int, chunk: int, start: int = 0, stop: int | None = None) -> list[slice]:
    """The chunk-aligned pieces of ``start:stop`` along an axis of ``n`` cut every ``chunk``."""
    stop = n if stop is None else stop
    return [slice(s, min(s + chunk, stop)) for s in range(start, stop, chunk)]


def real_blocks(n_tokens_p: np.ndarray, chunk_prompt: int, chunk_token: int, n_tokens: int) -> np.ndarray:
    """``(prompt chunks, token chunks)`` booleans: which (prompt, token) blocks hold at least one real position.

    >>> real_blocks(np.array([5, 3, 1]), 2, 2, 6).astype(int).tolist()
    [[1, 1, 1], [1, 0, 0]]
    """
    n_p = -(-len(n_tokens_p) // chunk_prompt)
    n_t = -(-n_tokens // chunk_token)
    longest = np.array([n_tokens_p[i * chunk_prompt:(i + 1) * chunk_prompt].max() for i in range(n_p)])
    return np.arange(n_t)[None, :] * chunk_token < longest[:, None]
