"""Attention masks built before the forward: the model never reads a mask's values on the host (a GPU sync per
forward), and the residuals stay those of the model's own 2-D-mask forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from capture.models.masks import prepared_mask, windowed_beyond
from capture.pipeline.runner import forward_residuals, pad_batch
from tests.helpers import ARCHS, PROMPTS, load


def _seqs(tokenizer_dir, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _reference(model, seqs):
    """Each prompt alone through the model as transformers runs it (its own 2-D mask handling)."""
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s]), output_hidden_states=True).hidden_states for s in seqs]


@pytest.fixture
def host_reads_forbidden(monkeypatch):
    """Fail if transformers asks a mask or position ids for values on the host (on CUDA: a sync)."""
    import transformers.masking_utils as mu

    def refuse(*args, **kwargs):
        raise AssertionError("the mask was read on the host")

    monkeypatch.setattr(mu, "fast_all", refuse)
    monkeypatch.setattr(mu, "find_packed_sequence_indices", refuse)


@pytest.mark.parametrize("arch", [*ARCHS, "gemma2"])
def test_padded_and_full_batches_read_nothing_on_the_host(arch, make_model, tokenizer_dir, request):
    model = load(make_model(arch))
    seqs = _seqs(tokenizer_dir, PROMPTS)
    reference = _reference(model, seqs)
    request.getfixturevalue("host_reads_forbidden")
    n_layers = len(reference[0]) - 1
    for batch in (seqs, [seqs[0], seqs[0]]):  # padded; no padding at all
        ids_bt, mask_bt = pad_batch(batch, 0)
        resid_bltd, final_btd = forward_residuals(model, model.get_input_embeddings(), ids_bt, mask_bt)
        for row, seq in enumerate(batch):
            hidden = reference[seqs.index(seq)]
            for layer in range(n_layers):
                torch.testing.assert_close(resid_bltd[row, layer, : len(seq)], hidden[layer][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(final_btd[row, : len(seq)], hidden[n_layers][0], atol=1e-5, rtol=0)


def test_a_window_shorter_than_the_batch_keeps_the_two_dimensional_mask(make_model, tokenizer_dir):
    """Mistral attending through 4 tokens: one 4-D causal mask would be wrong, so the 2-D mask goes in (and the
    model builds its windowed mask itself); the residuals still equal the model's own."""
    model = load(make_model("mistral", sliding_window=4))
    seqs = _seqs(tokenizer_dir, PROMPTS)
    ids_bt, mask_bt = pad_batch(seqs, 0)
    assert windowed_beyond(model.config, ids_bt.shape[1]) and not windowed_beyond(model.config, 4)
    embeds = model.get_input_embeddings()(ids_bt)
    assert prepared_mask(model.get_decoder(), embeds, mask_bt, mask_bt.cumsum(-1) - 1) is mask_bt
    resid_bltd, _ = forward_residuals(model, model.get_input_embeddings(), ids_bt, mask_bt)
    for row, (seq, hidden) in enumerate(zip(seqs, _reference(model, seqs), strict=True)):
        torch.testing.assert_close(resid_bltd[row, 1, : len(seq)], hidden[1][0], atol=1e-5, rtol=0)


def test_a_full_attention_model_with_a_configured_window_gets_the_four_dimensional_mask(make_model, tokenizer_dir):
    """Qwen2 records a sliding_window it does not use (every layer full attention): not a reason to fall back."""
    model = load(make_model("qwen2"))
    model.config.sliding_window = 2
    assert set(model.config.layer_types) == {"full_attention"} and not windowed_beyond(model.config, 100)
    ids_bt, mask_bt = pad_batch(_seqs(tokenizer_dir, PROMPTS), 0)
    mask = prepared_mask(model.get_decoder(), model.get_input_embeddings()(ids_bt), mask_bt, mask_bt.cumsum(-1) - 1)
    assert mask.ndim == 4 and mask.shape[0] == len(PROMPTS)


def test_the_final_state_comes_back_on_the_residuals_device(make_model, monkeypatch):
    """A model split over GPUs ends on another device than it starts; the final state is moved to the residuals'
    device, where the padding mask is (tested by the move asked of it: this machine has one device)."""
    import capture.pipeline.runner as runner

    model = load(make_model("llama"))
    asked = {}

    class Final:
        def to(self, **kwargs):
            asked.update(kwargs)
            return torch.zeros(1, 3, 32)

    body = model.get_decoder()
    monkeypatch.setattr(runner, "decoder", lambda m: _Fake(body, Final()))
    ids = torch.tensor([[1, 2, 3]])
    forward_residuals(model, model.get_input_embeddings(), ids, torch.ones_like(ids))
    assert asked == {"device": model.get_input_embeddings().weight.device, "dtype": torch.float32}


class _Fake:
    """A body that returns a given final state (its config is the real body's)."""

    def __init__(self, body, final) -> None:
        self.config, self.final = body.config, final

    def __call__(self, **kwargs):
        return SimpleNamespace(last_hidden_state=self.final)
