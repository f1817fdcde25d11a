"""--layers and --positions: the stored subsets equal slices of a full capture, labelled with true numbers."""

from __future__ import annotations

import numpy as np
import pytest

from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.errors import UsageError
from store.reader import open_store
from store.verify import verify_store
from tests.helpers import RAGGED


def _capture(make_model, path, **extra):
    base, sft = make_model("llama", seed=0), make_model("llama", seed=1)
    settings = CaptureSettings(base=str(base), sft=str(sft), prompts=RAGGED, store=str(path), store_dtype="float32",
                               device="cpu", top_k=3, **extra)
    return open_store(run_capture(settings, log=lambda *a: None, progress=False)).sortby("prompt")


@pytest.fixture(scope="module")
def full(make_model, tmp_path_factory):
    return _capture(make_model, tmp_path_factory.mktemp("full") / "s.zarr").load()


def test_layers_keep_their_true_numbers_and_equal_the_full_capture(full, make_model, tmp_path):
    part = _capture(make_model, tmp_path / "s.zarr", layers="0,2:4")
    assert part.layer.values.tolist() == [0, 2, 3]
    for name in ("resid", "entropy", "kl", "topk_id"):
        np.testing.assert_allclose(part[name].values, full[name].sel(layer=[0, 2, 3]).values, atol=1e-5,
                                   rtol=1e-5, equal_nan=True, err_msg=name)
    np.testing.assert_allclose(part.final.values, full.final.values, atol=1e-5, equal_nan=True)
    assert verify_store(tmp_path / "s.zarr") == []


@pytest.mark.parametrize("spec", ["first:3", "last:2"])
def test_positions_equal_each_prompts_slice_of_the_full_capture(spec, full, make_model, tmp_path):
    kind, count = spec.split(":")
    part = _capture(make_model, tmp_path / "s.zarr", positions=spec)
    assert part.sizes["token"] == int(count)
    for prompt in full.prompt.values:
        n = int(full.n_tokens.sel(prompt=prompt))
        start, stop = (0, min(n, int(count))) if kind == "first" else (max(0, n - int(count)), n)
        kept = stop - start
        got = part.sel(prompt=prompt)
        assert int(got.n_tokens) == kept and int(got.prompt_length) == n
        assert got.token_position.values[:kept].tolist() == list(range(start, stop))
        assert got.token_id.values[:kept].tolist() == full.token_id.sel(prompt=prompt).values[start:stop].tolist()
        for name in ("resid", "final", "entropy", "kl", "rise_shift"):
            want = full[name].sel(prompt=prompt).isel(token=slice(start, stop)).values
            np.testing.assert_allclose(got[name].isel(token=slice(0, kept)).values, want, atol=2e-5, rtol=1e-4,
                                       err_msg=f"{spec} {name} prompt {prompt}")
    assert verify_store(tmp_path / "s.zarr") == []


def test_bad_selections_are_one_line_errors(make_model, tmp_path):
    with pytest.raises(UsageError, match=r"layer 9 is outside 0\.\.3"):
        _capture(make_model, tmp_path / "a.zarr", layers="0,9")
    with pytest.raises(UsageError, match="must be first:N, last:N or all"):
        _capture(make_model, tmp_path / "b.zarr", positions="middle:4")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
