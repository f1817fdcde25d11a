from __future__ import annotations

import re

import pytest
import torch

from capture.errors import IncompatibleModels, MismatchedArchitectures, ModelLoadError
from capture.models.loading import check_compatible, load_model, read_shape
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.reader import open_store


def test_read_shape_from_config_only(make_model):
    shape = read_shape(str(make_model("gpt2")))
    assert (shape.arch, shape.n_layers, shape.hidden, shape.vocab) == ("gpt2", 3, 32, 320)


@pytest.mark.parametrize(
    ("override", "words"),
    [({"vocab_size": 384}, "vocabulary size 320 (base) vs 384 (SFT)"),
     ({"num_hidden_layers": 2}, "layer count 3 (base) vs 2 (SFT)")],
)
def test_incompatible_pair_fails_before_any_work(make_model, tmp_path, override, words):
    base, sft = make_model("llama", 0), make_model("llama", 1, **override)
    with pytest.raises(IncompatibleModels, match=re.escape(words)):
        check_compatible(read_shape(str(base)), read_shape(str(sft)))
    store = tmp_path / "s.zarr"
    with pytest.raises(IncompatibleModels):
        run_capture(CaptureSettings(base=str(base), sft=str(sft), store=str(store)), progress=False)
    assert not store.exists()


def test_two_architectures_of_one_shape_are_refused_before_loading(make_model, tmp_path, monkeypatch):
    """A Llama body and a GPT-2 body that share width, depth and vocabulary: refused in one line naming
    both, before any weights load; --allow-mismatched-pair goes on and the store records it."""
    import capture.models.loading

    base, sft = make_model("llama", 0), make_model("gpt2", 1)
    store = tmp_path / "s.zarr"
    settings = CaptureSettings(base=str(base), sft=str(sft), store=str(store), prompts=["Yes"], lens=False)
    loads = []
    monkeypatch.setattr(capture.models.loading, "load_model", lambda *a, **k: loads.append(a) or None)
    with pytest.raises(MismatchedArchitectures, match=r"base model is a llama \(.*\) but the SFT model is a gpt2"):
        run_capture(settings, progress=False)
    assert not loads and not store.exists()
    monkeypatch.undo()
    settings.allow_mismatched_pair = True
    run_capture(settings, progress=False)
    attrs = open_store(store).attrs
    assert attrs["content_fingerprint"]["allow_mismatched_pair"] is True
    assert attrs["models"]["base"]["arch"] == "llama" and attrs["models"]["sft"]["arch"] == "gpt2"


def test_hidden_size_mismatch_named(make_model):
    a = read_shape(str(make_model("qwen2", 0)))
    b = read_shape(str(make_model("qwen2", 0, hidden_size=48)))
    with pytest.raises(IncompatibleModels, match="hidden size 32 \\(base\\) vs 48"):
        check_compatible(a, b)


def test_missing_model_errors_say_what_to_do(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        read_shape(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="pass its local directory instead") as info:
        load_model("some-org/model-that-is-not-here")
    assert isinstance(info.value, OSError)


def test_pickle_checkpoints_are_refused_unless_allowed(make_model, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file

    from cli import main

    pickled = tmp_path / "pickled"
    shutil.copytree(make_model("llama", seed=0), pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    store = tmp_path / "s.zarr"
    args = ["capture", "--base", str(pickled), "--sft", str(make_model("llama", seed=1)), "--store", str(store),
            "--prompt", "hello", "--quiet", "--no-lens"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has only pickle weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not store.exists()
    assert main([*args, "--allow-pickle"]) == 0
    assert store.exists()
    # the other side: the pickled model as the SFT, whose embeddings are read alone
    args[2], args[4] = str(make_model("llama", seed=1)), str(pickled)
    assert main([*args, "--store", str(tmp_path / "t.zarr")]) == 2
    assert main([*args, "--store", str(tmp_path / "t.zarr"), "--allow-pickle"]) == 0
