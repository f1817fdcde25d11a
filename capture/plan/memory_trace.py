"""The peak of a block of code's CPU tensor allocations, traced (what the memory plan's batch terms predict).

torch's profiler records every allocation and free of the CPU allocator with the allocator's running total;
the peak over a block, less the total before it, is what the block allocated at most at once. Unlike the
process's peak RSS it has no allocator caching, fragmentation or page-fault granularity in it, so it
measures the plan's formulas themselves (``capture.plan.budget.forward_activations``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator


def traced_peak(block: Callable[[], object]) -> int:
    """Bytes the CPU allocator held at most at once while ``block()`` ran, beyond what it held before.

    >>> import torch
    >>> traced_peak(lambda: torch.ones(1000, 1000) + 1) >= 2 * 4_000_000  # the ones and the sum, together
    True
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        block()
    allocations = sorted(_allocations(prof.profiler.kineto_results.experimental_event_tree()),
                         key=lambda node: node.start_time_ns)
    if not allocations:
        return 0
    first = allocations[0].extra_fields
    before = first.total_allocated - first.alloc_size
    return max(node.extra_fields.total_allocated for node in allocations) - before


def _allocations(nodes) -> Iterator:
    from torch._C._profiler import _EventType

    for node in nodes:
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            yield node
        yield from _allocations(node.children)
