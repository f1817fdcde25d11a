"""Residuals recorded by hooks against the model's own ``hidden_states``."""

from __future__ import annotations

import pytest
import torch

from capture.models.hooks import ResidualRecorder
from capture.models.loading import decoder_layers
from capture.pipeline.runner import forward_residuals
from tests.helpers import ARCHS, PROMPTS, load


def _ids(tokenizer_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("arch", ARCHS)
def test_residuals_equal_hidden_states(arch, make_model, tokenizer_dir):
    model = load(make_model(arch))
    ids = _ids(tokenizer_dir, PROMPTS[2])
    with torch.no_grad():
        reference = model(input_ids=ids, output_hidden_states=True)
    hidden = reference.hidden_states
    n_layers = len(decoder_layers(model))
    assert len(hidden) == n_layers + 1

    resid_bltd, final_btd = forward_residuals(model, model.get_input_embeddings(), ids, torch.ones_like(ids))

    assert resid_bltd.shape == (1, n_layers + 1, ids.shape[1], hidden[0].shape[-1])
    for layer in range(n_layers):  # hidden_states[L] is post-norm, compared with `final` below
        torch.testing.assert_close(resid_bltd[:, layer], hidden[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(final_btd, hidden[n_layers], atol=1e-5, rtol=0)
    # The last recorded layer is raw, so it must differ from the post-norm state.
    assert (resid_bltd[:, n_layers] - hidden[n_layers]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_last_layer_equals_hook_on_last_block(arch, make_model, tokenizer_dir):
    model = load(make_model(arch))
    ids = _ids(tokenizer_dir, PROMPTS[0])
    seen = []
    last_block = decoder_layers(model)[-1]
    handle = last_block.register_forward_hook(
        lambda mod, args, out: seen.append((out[0] if isinstance(out, tuple) else out).clone())
    )
    try:
        resid_bltd, _ = forward_residuals(model, model.get_input_embeddings(), ids, torch.ones_like(ids))
    finally:
        handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(resid_bltd[:, -1], seen[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_invariance(arch, make_model, tokenizer_dir):
    from transformers import AutoTokenizer

    model = load(make_model(arch))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    seqs = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    n_max = max(len(s) for s in seqs)
    ids_bt = torch.zeros((len(seqs), n_max), dtype=torch.long)
    mask_bt = torch.zeros_like(ids_bt)
    for row, seq in enumerate(seqs):
        ids_bt[row, : len(seq)] = torch.tensor(seq)
        mask_bt[row, : len(seq)] = 1
    batched_bltd, batched_final = forward_residuals(model, model.get_input_embeddings(), ids_bt, mask_bt)
    for row, seq in enumerate(seqs):
        alone = torch.tensor([seq])
        alone_bltd, alone_final = forward_residuals(model, model.get_input_embeddings(), alone, torch.ones_like(alone))
        torch.testing.assert_close(batched_bltd[row, :, : len(seq)], alone_bltd[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched_final[row, : len(seq)], alone_final[0], atol=1e-5, rtol=0)


def test_recorder_removes_its_hooks(make_model):
    model = load(make_model("llama"))
    layers = decoder_layers(model)
    before = [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layers]
    with ResidualRecorder(layers, torch.empty(1, len(layers) + 1, 2, 32)):
        assert sum(len(layer._forward_hooks) for layer in layers) == len(layers)
    assert [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in layers] == before


def test_recorder_rejects_wrong_buffer(make_model):
    model = load(make_model("llama"))
    with pytest.raises(ValueError, match="3 layer slots for 4 kept layers"):
        ResidualRecorder(decoder_layers(model), torch.empty(1, 3, 2, 32))
