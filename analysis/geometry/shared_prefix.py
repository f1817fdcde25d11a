"""Positions that repeat across prompts: the same tokens up to them, so the same residuals and statistics.

A chat template puts the same text at the start of every conversation (SmolLM's default
system prompt is 30 tokens); in a causal model a position whose preceding tokens are the
same in two prompts has the same residual in both. Listed once per prompt, such a position
fills a hotspot or largest-KL table with copies of one number. Here each such position is
found by its prefix: the first prompt (in store order) that has it keeps it, with the count
of prompts sharing it, and the others' copies are marked as repeats, for tables to leave out.
The user's text starts at the first token whose ``role`` is not ``template``.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.schema import TEMPLATE_ROLE


def shared_positions(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(repeat_pt, count_pt) over store rows, for the chat template's own text: ``repeat`` marks a template
    position whose prefix (its token and all before it) an earlier prompt has too; ``count`` is, at the first
    prompt with that prefix, how many prompts share it (1 everywhere else).

    Only template text counts: it is what a chat template repeats, and the rule that a shared prefix means a
    shared residual holds for a real capture (a causal model), not for made-up data.

    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from analysis import open_store
    >>> repeat, count = shared_positions(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> bool(repeat.any()), int(count.max())  # no chat template, so nothing is template text
    (False, 1)
    """
    shape = (ds.sizes["prompt"], ds.sizes["token"])
    template = np.asarray(ds.role.values) == TEMPLATE_ROLE if "role" in ds.coords else np.zeros(shape, bool)
    if not template.any():  # no template text: nothing to walk the prefixes for
        return np.zeros(shape, bool), np.ones(shape, np.int64)
    repeat, count = _shared_prefixes(np.asarray(ds.token_id.values), np.asarray(ds.n_tokens.values))
    return repeat & template, np.where(template, count, 1)


def _shared_prefixes(ids: np.ndarray, n_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shared_positions` for every position, template or not.

    >>> repeat, count = _shared_prefixes(np.array([[5, 6, 7], [5, 6, 8], [5, 9, -1]]), np.array([3, 3, 2]))
    >>> repeat.tolist(), count[0].tolist()
    ([[False, False, False], [True, True, False], [True, False, False]], [3, 2, 1])
    """
    repeat = np.zeros(ids.shape, dtype=bool)
    count = np.zeros(ids.shape, dtype=np.int64)
    # A trie of prefixes: node ids are exact (no hashing of token sequences, so no collisions).
    nodes: dict[tuple[int, int], int] = {}  # (parent node, token id) -> node
    first: dict[int, tuple[int, int]] = {}  # node -> (row, position) where its prefix was first seen
    for row in range(ids.shape[0]):
        node = -1
        for t in range(int(n_tokens[row])):
            node = nodes.setdefault((node, int(ids[row, t])), len(nodes))
            seen = first.get(node)
            if seen is None:
                first[node] = (row, t)
                count[row, t] = 1
            else:
                repeat[row, t] = True
                count[seen] += 1
    return repeat, count


def user_start(ds: xr.Dataset) -> np.ndarray:
    """(prompt,): the first position of each prompt that is not the chat template's own text (0 without roles)."""
    if "role" not in ds.coords:
        return np.zeros(ds.sizes["prompt"], dtype=np.int64)
    roles = np.asarray(ds.role.values)
    n_tokens = np.asarray(ds.n_tokens.values)
    own = (roles != TEMPLATE_ROLE) & (np.arange(roles.shape[1])[None, :] < n_tokens[:, None])
    return np.where(own.any(axis=1), own.argmax(axis=1), 0).astype(np.int64)
