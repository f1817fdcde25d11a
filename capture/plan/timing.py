"""``capture --plan``'s time: each stage's wall time, from a short calibration of this machine.

Planning, not execution: nothing here loads a model. A calibration of about a second measures
what the stages are made of, on the run's device and dtype:

- ``forward``: matrix products of a decoder block's shape (tokens x hidden by hidden x ffn), the
  bulk of a forward pass's work, in FLOP/s;
- ``products``: the lens product (rows x hidden by hidden x vocabulary chunk), in FLOP/s;
- ``disk``: a plain write of 64 MiB with fsync next to the store, in bytes/s.

Then the residual stage costs ``2 x body parameters x padded tokens`` per pass (plus the causal
attention's ``4 x layers x hidden x tokens^2 / 2`` per prompt) at the forward rate, and its store
bytes at the disk rate; the statistics stage ``2 x vocabulary x hidden`` per row (position x lens
layer x lens) and pass at the products rate, times :data:`STATISTICS_OVERHEAD` for the softmax,
KL and top-k reductions around the products (measured: statistics / products 1.15 on the CPU,
BENCHMARKS.md). Estimates, not promises: they are printed to the nearest useful unit.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

STATISTICS_OVERHEAD = 1.3  # statistics / bare lens products on the CPU (1.15 measured) with some margin
FORWARD_EFFICIENCY = 0.7  # a real forward reaches this share of its largest matmul's rate (norms, attention)


@dataclass(frozen=True)
class Calibration:
    """Rates measured on this machine."""

    forward_flops: float
    products_flops: float
    disk_bytes_per_s: float

    def describe(self) -> str:
        return (f"matmul {self.forward_flops / 1e9:.0f} GFLOP/s (block shapes), {self.products_flops / 1e9:.0f} "
                f"GFLOP/s (lens shapes), disk {self.disk_bytes_per_s / 2**20:.0f} MiB/s")


def _matmul_rate(rows: int, inner: int, cols: int, device: str, dtype: torch.dtype, seconds: float = 0.3) -> float:
    a = torch.randn(rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    a @ b  # warm-up: allocator, kernels
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2:
        a @ b
        done += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2.0 * rows * inner * cols * done / (time.perf_counter() - start)


def _disk_rate(directory: Path, size: int = 64 << 20) -> float:
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".resdiff-calibration-") as fh:
        start = time.perf_counter()
        for _ in range(size >> 20):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
        return size / (time.perf_counter() - start)


def calibrate(hidden: int, ffn: int, vocab_chunk: int, block_rows: int, device: str, dtype: torch.dtype,
              store_dir: Path) -> Calibration:
    """About a second of measurements on ``device`` at the model's shapes (no model is loaded)."""
    rows = 512
    forward = _matmul_rate(rows, hidden, max(ffn, hidden), device, dtype)
    products = _matmul_rate(min(block_rows, 1024), hidden, vocab_chunk, device, torch.float32)
    return Calibration(forward, products, _disk_rate(store_dir))


@dataclass(frozen=True)
class StageTimes:
    """Estimated seconds per stage."""

    forwards: float
    writes: float
    statistics: float

    @property
    def residuals(self) -> float:
        return max(self.forwards, self.writes) if self.overlapped else self.forwards + self.writes

    overlapped: bool = True  # the residual stage writes a group while the next computes

    @property
    def total(self) -> float:
        return self.residuals + self.statistics


def estimate(calibration: Calibration, *, body_params: int, n_layers: int, hidden: int, vocab: int,
             batches: list[tuple[int, int]], n_passes: int, store_bytes: int, statistics_rows: int) -> StageTimes:
    """Seconds of each stage: ``batches`` are (prompts, padded length) of one pass's compute batches,
    ``statistics_rows`` the rows of the statistics stage (positions x lens layers x lenses)."""
    flops = 0.0
    for prompts, length in batches:
        tokens = prompts * length
        flops += 2.0 * body_params * tokens + 2.0 * n_layers * hidden * prompts * length * length
    forwards = n_passes * flops / (calibration.forward_flops * FORWARD_EFFICIENCY)
    writes = store_bytes / calibration.disk_bytes_per_s
    products = statistics_rows * n_passes * 2.0 * vocab * hidden
    return StageTimes(forwards, writes, STATISTICS_OVERHEAD * products / calibration.products_flops)


def format_seconds(seconds: float) -> str:
    """Seconds as a person reads a duration.

    >>> format_seconds(42.0), format_seconds(150.0), format_seconds(7600.0)
    ('42 s', '2.5 min', '2.1 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
