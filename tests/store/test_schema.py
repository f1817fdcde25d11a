from __future__ import annotations

import itertools

import pytest

from store.schema import TARGET_CHUNK_BYTES, choose_chunking, write_groups


@pytest.mark.parametrize(
    ("n_prompts", "n_layers1", "n_tokens", "hidden", "itemsize"),
    [(1000, 29, 128, 1536, 2), (4, 5, 50, 64, 2), (64, 25, 100, 896, 2), (1, 41, 4096, 4096, 2), (7, 13, 48, 768, 4)],
)
def test_chunks_are_bounded_and_balanced(n_prompts, n_layers1, n_tokens, hidden, itemsize):
    c = choose_chunking(n_prompts, n_layers1, n_tokens, hidden, itemsize)
    slab = n_tokens * hidden * itemsize
    assert 1 <= c.prompt <= n_prompts and 1 <= c.layer <= n_layers1
    assert c.prompt * c.layer * slab <= max(TARGET_CHUNK_BYTES, slab)
    if c.prompt < n_prompts and c.layer < n_layers1:
        assert abs(c.prompt - c.layer) <= max(c.prompt, c.layer) // 2 + 1  # roughly square tiles


def test_small_stores_are_one_chunk():
    c = choose_chunking(4, 5, 50, 64, 2)
    assert (c.prompt, c.layer) == (4, 5)


@pytest.mark.parametrize(("n", "chunk", "batch"), [(10, 3, 1), (10, 3, 4), (10, 4, 4), (5, 8, 2), (9, 2, 9)])
def test_write_groups_are_chunk_aligned_and_cover_everything(n, chunk, batch):
    groups = write_groups(n, chunk, batch)
    assert groups[0].start == 0 and groups[-1].stop == n
    for a, b in itertools.pairwise(groups):
        assert a.stop == b.start
    for g in groups:
        assert g.start % chunk == 0
        assert g.stop == n or g.stop % chunk == 0
        assert g.stop - g.start >= min(batch, n - g.start)
