"""Device-to-host copies of a batch's results, made behind the computation.

On CUDA the tensors of a batch are copied on a side stream into pinned (page-locked)
host memory without blocking the host, which goes on to launch the next batch; it
waits only when it needs the values, on that copy's own event. So the GPU computes
batch N + 1 while batch N is copied, and the host places batch N into its write group
meanwhile (double buffering: one batch computing, one being copied). Pinned buffers
come from torch's caching host allocator, which reuses them and does not hand one out
again before the copy that used it has finished; ``record_stream`` does the same for
the device tensors, whose memory the compute stream would otherwise reuse at once.

On the CPU a copy is finished when it starts: the tensors are already host memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch

Item = TypeVar("Item")


class HostCopy:
    """Host copies of some tensors, ready once :meth:`wait` returns."""

    def __init__(self, tensors: list[torch.Tensor], event: torch.cuda.Event | None) -> None:
        self._tensors, self._event = tensors, event

    def wait(self) -> list[np.ndarray]:
        """Block until the copy is done (only this copy's event); the copies as numpy arrays."""
        if self._event is not None:
            self._event.synchronize()
        return [t.numpy() for t in self._tensors]


class DeviceToHost:
    """Starts :class:`HostCopy` objects for tensors on ``device`` (see the module docstring).

    >>> copies = DeviceToHost(torch.device("cpu"))
    >>> copies.start(torch.arange(3)).wait()[0].tolist()
    [0, 1, 2]
    """

    def __init__(self, device: torch.device) -> None:
        if device.type == "cuda" and device.index is None:  # "cuda" means the current one; tensors name theirs
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Copies worth leaving in flight while the next batch is launched: one on CUDA (double buffering);
        # none elsewhere, where a copy is done when started and keeping it would only hold its memory longer.
        self.in_flight = 1 if self._stream is not None else 0

    def start(self, *tensors: torch.Tensor) -> HostCopy:
        """Copy ``tensors`` (views are fine) to the host, once the work queued so far has made them.

        The tensors may be freed at once, but not changed in place before the copy is waited for.
        """
        if self._stream is None:
            return HostCopy([t.detach().cpu() for t in tensors], None)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        hosts = []
        with torch.cuda.stream(self._stream):
            for tensor in tensors:
                if tensor.device != self.device:  # another device's tensor (a split model): a plain, blocking copy
                    hosts.append(tensor.cpu())
                    continue
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(self._stream)
                hosts.append(host)
            event = torch.cuda.Event()
            event.record(self._stream)
        return HostCopy(hosts, event)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from pinned memory and without blocking the host where that is CUDA
    (a copy from pageable memory may first wait for the work already queued on the GPU)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def arrivals(copies: DeviceToHost, launched: Iterable[tuple[Item, HostCopy]]) -> Iterator[tuple[Item, list]]:
    """``(item, host arrays)`` for each ``(item, copy)`` of ``launched``, in order, leaving
    ``copies.in_flight`` copies pending: on CUDA the next item is launched (``launched`` advanced)
    before the last one's copy is waited for; elsewhere each is handed on as soon as it is made.

    >>> copies = DeviceToHost(torch.device("cpu"))
    >>> [(i, a[0].tolist()) for i, a in arrivals(copies, ((i, copies.start(torch.tensor([i]))) for i in range(2)))]
    [(0, [0]), (1, [1])]
    """
    pending: deque[tuple[Item, HostCopy]] = deque()
    for item in launched:
        pending.append(item)
        while len(pending) > copies.in_flight:
            done, copy = pending.popleft()
            yield done, copy.wait()
    while pending:
        done, copy = pending.popleft()
        yield done, copy.wait()
