"""The CUDA path: the same store as on the CPU, and the plan's prediction of CUDA memory.

Skipped where no GPU is visible (CI); run on a GPU machine with
``pytest tests/capture/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from capture.pipeline.job import run_capture
from capture.plan.memory import plan_capture
from capture.settings import CaptureSettings
from tests.helpers import PROMPTS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _capture(base, sft, path, device: str, **extra):
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=PROMPTS, device=device, store=str(path),
                               store_dtype="float32", top_k=5, **extra)
    run_capture(settings, log=lambda *a: None, progress=False)
    return xr.open_zarr(path)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_cuda_store_matches_cpu(arch, make_model, tmp_path):
    base, sft = make_model(arch, 0), make_model(arch, 1)
    on_cpu = _capture(base, sft, tmp_path / "cpu.zarr", "cpu")
    on_gpu = _capture(base, sft, tmp_path / "gpu.zarr", "cuda")
    assert on_gpu.attrs["device"] == "cuda"
    # Different kernels and summation orders: equal to float32 rounding, not bit for bit.
    np.testing.assert_allclose(on_gpu.resid.values, on_cpu.resid.values, atol=2e-4, rtol=1e-4, equal_nan=True)
    for name in ("entropy", "lse", "kl"):
        np.testing.assert_allclose(on_gpu[name].values, on_cpu[name].values, atol=5e-4, rtol=1e-4, equal_nan=True)
    same_top = (on_gpu.topk_id.values == on_cpu.topk_id.values).mean()
    assert same_top > 0.99  # near-ties may swap places


def test_plan_predicts_cuda_peak(make_model, tmp_path):
    base, sft = make_model("llama", 0), make_model("llama", 1)
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=PROMPTS * 8, device="cuda",
                               store=str(tmp_path / "s.zarr"), batch_size=8)
    plan = plan_capture(settings, log=lambda *a: None)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    run_capture(settings, log=lambda *a: None, progress=False)
    measured = torch.cuda.max_memory_allocated() - start
    predicted = plan.peak - plan.baseline
    assert 0.8 * measured <= predicted <= 1.2 * measured, (predicted, measured, plan.describe())


def test_fused_lens_statistics_on_cuda_match_the_cpu_kernels():
    from torch import nn

    from capture.lens.cuda_fused import available
    from capture.lens.logit_lens import Lens, lens_statistics

    assert available(torch.device("cuda"))  # auto picks the fused path on CUDA: Triton must be there
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(40000, 64, generator=gen) for _ in range(2)]  # chunks 16384, 16384, 7232 (eager tail)
    h = [torch.randn(300, 64, generator=gen) * 2 for _ in range(4)]
    pairs, tracked = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], [5, 39999]
    on = lambda device: [Lens(w.to(device), nn.Identity()) for w in (weights[0], weights[1], weights[0], weights[1])]  # noqa: E731
    cpu = lens_statistics(h, on("cpu"), pairs, 10, tracked, vocab_chunk=16384, backend="kernels")
    gpu = lens_statistics([x.cuda() for x in h], on("cuda"), pairs, 10, tracked, vocab_chunk=16384)
    for field in ("entropy_pn", "lse_pn", "topk_logit_pnk", "kl_qn", "rise_shift_qnk", "fall_shift_qnk", "tracked_pnj"):
        torch.testing.assert_close(getattr(gpu, field).cpu(), getattr(cpu, field), rtol=1e-4, atol=5e-4, msg=field)
    for field in ("topk_id_pnk", "rise_id_qnk", "fall_id_qnk"):
        assert (getattr(gpu, field).cpu() == getattr(cpu, field)).float().mean() > 0.99, field  # near-ties may swap
