"""Chunk choice for uniform and ragged prompt sets, write groups, and padding-only blocks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from store.chunking import (
    MAX_WASTE,
    TARGET_CHUNK_BYTES,
    choose_chunking,
    real_blocks,
    stored_cells,
    write_groups,
)


@pytest.mark.parametrize(
    ("n_prompts", "n_layers1", "n_tokens", "hidden", "itemsize"),
    [(1000, 29, 128, 1536, 2), (4, 5, 50, 64, 2), (64, 25, 100, 896, 2), (1, 41, 4096, 4096, 2), (7, 13, 48, 768, 4)],
)
def test_one_length_gives_whole_prompts_in_bounded_square_tiles(n_prompts, n_layers1, n_tokens, hidden, itemsize):
    c = choose_chunking([n_tokens] * n_prompts, n_layers1, hidden, itemsize)
    slab = n_tokens * hidden * itemsize
    assert c.token == n_tokens and 1 <= c.prompt <= n_prompts and 1 <= c.layer <= n_layers1
    assert c.prompt * c.layer * slab <= max(TARGET_CHUNK_BYTES, slab)
    if c.prompt < n_prompts and c.layer < n_layers1:
        assert abs(c.prompt - c.layer) <= max(c.prompt, c.layer) // 2 + 1  # roughly square tiles


def test_small_stores_are_one_chunk():
    c = choose_chunking([50] * 4, 5, 64, 2)
    assert (c.prompt, c.layer, c.token) == (4, 5, 50)


def _ragged(n: int, seed: int = 0) -> np.ndarray:
    """Log-normal lengths: median ~40 tokens, a long tail (like real text)."""
    return np.clip(np.random.default_rng(seed).lognormal(np.log(40), 0.9, n).astype(int), 3, 2000)


@pytest.mark.parametrize(("n", "hidden", "n_layers1"), [(100, 576, 31), (5000, 64, 5), (50000, 64, 5), (300, 4096, 41)])
def test_ragged_sets_store_at_most_ten_percent_more_than_their_real_tokens(n, hidden, n_layers1):
    lengths = _ragged(n)
    c = choose_chunking(lengths, n_layers1, hidden, 2)
    stored = stored_cells(np.sort(lengths)[::-1], c.prompt, c.token)
    assert stored <= MAX_WASTE * lengths.sum()
    assert c.prompt * c.layer * c.token * hidden * 2 <= TARGET_CHUNK_BYTES


@pytest.mark.parametrize(("n", "chunk", "batch"), [(10, 3, 1), (10, 3, 4), (10, 4, 4), (5, 8, 2), (9, 2, 9)])
def test_write_groups_are_chunk_aligned_and_cover_everything(n, chunk, batch):
    lengths = sorted(range(5, 5 + n), reverse=True)
    groups = write_groups(lengths, chunk, batch, batch_tokens=10**9)
    assert groups[0].start == 0 and groups[-1].stop == n
    for a, b in itertools.pairwise(groups):
        assert a.stop == b.start
    for g in groups:
        assert g.start % chunk == 0
        assert g.stop == n or g.stop % chunk == 0
        assert g.stop - g.start >= min(batch, n - g.start)


def test_write_groups_stop_at_the_token_budget():
    groups = write_groups([100] * 8, 1, batch_size=64, batch_tokens=300)
    assert [g.stop - g.start for g in groups] == [3, 3, 2]


def test_real_blocks_follow_the_longest_prompt_of_each_chunk():
    blocks = real_blocks(np.array([9, 2, 4, 1, 1]), chunk_prompt=2, chunk_token=4, n_tokens=9)
    assert blocks.astype(int).tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
