"""Compute batches: consecutive prompts of similar length under a prompt and a padded-token budget.

Planning only (no torch): the capture's runner forms its batches with :func:`compute_batches`,
and the memory and time plans count the same batches before any model is loaded.
"""

from __future__ import annotations


def compute_batches(lengths: list[int], rows: slice, batch_size: int, batch_tokens: int,
                    max_padding: float = float("inf")) -> list[slice]:
    """Consecutive prompts of ``rows`` in batches of at most ``batch_size`` prompts and ``batch_tokens``
    padded tokens (prompts times the batch's longest; a prompt longer than the budget runs alone), whose padded
    tokens are at most ``1 + max_padding`` times their real tokens (a batch of one never pads).

    Prompts are in store order, longest first, so a batch holds prompts of similar length.

    >>> compute_batches([90, 50, 40, 40, 10], slice(0, 5), batch_size=8, batch_tokens=100)
    [slice(0, 1, None), slice(1, 3, None), slice(3, 5, None)]
    >>> compute_batches([90, 50, 40, 40, 10], slice(0, 5), batch_size=8, batch_tokens=1000, max_padding=0.05)
    [slice(0, 1, None), slice(1, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    batches, start = [], rows.start
    while start < rows.stop:
        stop, longest, real = start + 1, lengths[start], lengths[start]
        while stop < rows.stop and stop - start < batch_size:
            wide = max(longest, lengths[stop])
            padded = (stop - start + 1) * wide
            if padded > batch_tokens or padded > (1 + max_padding) * (real + lengths[stop]):
                break
            longest, real = wide, real + lengths[stop]
            stop += 1
        batches.append(slice(start, stop))
        start = stop
    return batches
