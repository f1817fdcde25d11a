"""Lens logits of new tokens from a store's saved lens, against the stored tracked logits."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from analysis import LensNotSaved, lens_logits
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.reader import open_store
from store.testing import CountingScheduler
from tests.helpers import PROMPTS


@pytest.mark.parametrize("arch", ["gpt2", "gemma", "qwen2"])
def test_saved_lens_reproduces_tracked_logits_lazily(arch, make_model, tmp_path):
    base, sft = make_model(arch, seed=0), make_model(arch, seed=1)
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=PROMPTS[:2], store=str(tmp_path / "s"),
                               store_dtype="float32", device="cpu", track=["5", "77", "300"], save_lens=True, top_k=3)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False))
    assert set(ds.attrs["saved_lens"]) == {"base", "sft"}
    for lens in ("raw", "norm"):
        with dask.config.set(scheduler=CountingScheduler(0)):
            logits = lens_logits(ds, [5, 77, 300], lens=lens)  # builds the graph, computes nothing
        assert logits.dims == ("pass_", "prompt", "layer", "token", "token_q")
        expected = ds.tracked_logit.sel(lens=lens).values
        np.testing.assert_allclose(logits.values, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


def test_without_saved_lens_is_a_clear_error(make_model, tmp_path):
    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=PROMPTS[:1], store=str(tmp_path / "s"),
                               device="cpu", top_k=2)
    ds = open_store(run_capture(settings, log=lambda *a: None, progress=False))
    with pytest.raises(LensNotSaved, match="recapture with --save-lens"):
        lens_logits(ds, [1])
