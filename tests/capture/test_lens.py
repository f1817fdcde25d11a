"""Logit-lens statistics against a plain float64 reference, one position at a time.

The reference follows the formulas of the legacy format (section 1.4 of
legacy-format.md): z = h W^T, p = softmax(z), entropy = -sum p log p,
KL(right || left) = sum p_r (log p_r - log p_l), shifts = z_r - z_l.
"""

from __future__ import annotations

import math

import pytest
import torch

from capture.lens.logit_lens import Lens, lens_statistics
from capture.models.loading import final_norm
from tests.helpers import ARCHS, PROMPTS, load


def ref_position(h_l, h_r, w_l, w_r, k, tracked):
    """Plain float64 statistics for one position (lists, loops, no batching)."""
    z_l = [sum(float(a) * float(b) for a, b in zip(h_l, row, strict=True)) for row in w_l.double()]
    z_r = [sum(float(a) * float(b) for a, b in zip(h_r, row, strict=True)) for row in w_r.double()]

    def log_softmax(z):
        m = max(z)
        lse = m + math.log(sum(math.exp(x - m) for x in z))
        return [x - lse for x in z]

    lp_l, lp_r = log_softmax(z_l), log_softmax(z_r)
    entropy_l = -sum(math.exp(a) * a for a in lp_l)
    entropy_r = -sum(math.exp(a) * a for a in lp_r)
    kl = sum(math.exp(b) * (b - a) for a, b in zip(lp_l, lp_r, strict=True))
    shift = [b - a for a, b in zip(z_l, z_r, strict=True)]
    order = sorted(range(len(shift)), key=lambda i: -shift[i])
    top_l = sorted(range(len(z_l)), key=lambda i: -z_l[i])[:k]
    return {
        "entropy_l": entropy_l, "entropy_r": entropy_r, "kl": kl,
        "rise": order[:k], "rise_val": [shift[i] for i in order[:k]],
        "fall": order[::-1][:k], "fall_val": [shift[i] for i in order[::-1][:k]],
        "top_l": top_l, "top_l_val": [z_l[i] for i in top_l],
        "tracked_l": [z_l[i] for i in tracked], "tracked_r": [z_r[i] for i in tracked],
    }


def _close(a, b, rel=1e-5, abs_=1e-7):
    return abs(a - b) <= rel * max(abs(a), abs(b)) + abs_


@pytest.mark.parametrize("backend", ["kernels", "torch"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "llama", "gemma"])
def test_statistics_match_plain_reference(arch, backend, make_model):
    left, right = load(make_model(arch, seed=0)), load(make_model(arch, seed=1))
    lens_l, lens_r = Lens.from_model(left), Lens.from_model(right)
    gen = torch.Generator().manual_seed(0)
    h_l = torch.randn(6, 32, generator=gen) * 3
    h_r = h_l + 0.5 * torch.randn(6, 32, generator=gen)
    tracked = [0, 5, 77, 319]
    # Small chunks exercise the online merge across many chunks.
    stats = lens_statistics([h_l, h_r], [lens_l, lens_r], [(0, 1)], top_k=5, tracked_ids=tracked, vocab_chunk=37,
                            backend=backend)
    for n in range(h_l.shape[0]):
        ref = ref_position(h_l[n], h_r[n], lens_l.weight_vd, lens_r.weight_vd, 5, tracked)
        assert _close(float(stats.entropy_pn[0, n]), ref["entropy_l"])
        assert _close(float(stats.entropy_pn[1, n]), ref["entropy_r"])
        assert _close(float(stats.kl_qn[0, n]), ref["kl"], abs_=1e-6)
        assert stats.rise_id_qnk[0, n].tolist() == ref["rise"]
        assert stats.fall_id_qnk[0, n].tolist() == ref["fall"]
        assert stats.topk_id_pnk[0, n].tolist() == ref["top_l"]
        for got, want in [(stats.rise_shift_qnk[0, n], ref["rise_val"]), (stats.fall_shift_qnk[0, n], ref["fall_val"]),
                          (stats.topk_logit_pnk[0, n], ref["top_l_val"]), (stats.tracked_pnj[0, n], ref["tracked_l"]),
                          (stats.tracked_pnj[1, n], ref["tracked_r"])]:
            assert all(_close(float(g), w, abs_=1e-5) for g, w in zip(got, want, strict=True)), (got, want)


def test_peaked_distribution_keeps_its_entropy(make_model):
    lens = Lens.from_model(load(make_model("llama", seed=0)))
    w = lens.weight_vd[7:8]
    h = w * (60 / (w @ w.T))  # a state pointing at one token: logit 60 there, nearly all mass on it
    stats = lens_statistics([h], [lens], [], top_k=3, tracked_ids=[], vocab_chunk=50)
    ref = ref_position(h[0], h[0], lens.weight_vd, lens.weight_vd, 3, [])
    assert ref["entropy_l"] < 1e-2
    assert _close(float(stats.entropy_pn[0, 0]), ref["entropy_l"], rel=1e-4, abs_=1e-9)


def _random_lenses(vocab: int, dim: int, seed: int, count: int = 2):
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    return [Lens(torch.randn(vocab, dim, generator=gen), nn.Identity()) for _ in range(count)], gen


# 4096: the torch path selects through segments; the fused path runs every chunk compiled at every width (chunks
# of one width, whole segments, the last padded with -inf: capture.lens.cuda_fused.chunk_bounds).
@pytest.mark.parametrize("backend", ["torch", pytest.param("fused", marks=pytest.mark.slow)])
@pytest.mark.parametrize("vocab_chunk", [1024, 2048, 4096])
def test_backends_agree_on_a_large_vocabulary(vocab_chunk, backend):
    lenses, gen = _random_lenses(9000, 24, 1)
    h = [torch.randn(33, 24, generator=gen) * 3 for _ in range(3)]
    args = (h, [lenses[0], lenses[1], lenses[0]], [(0, 1), (0, 2), (1, 2)], 7, [3, 8999])
    a = lens_statistics(*args, vocab_chunk=vocab_chunk, backend="kernels")
    b = lens_statistics(*args, vocab_chunk=vocab_chunk, backend=backend)
    for field in ("topk_id_pnk", "rise_id_qnk", "fall_id_qnk"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    for field in ("entropy_pn", "lse_pn", "topk_logit_pnk", "kl_qn", "rise_shift_qnk", "fall_shift_qnk", "tracked_pnj"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-6, msg=field)


def test_kl_of_identical_passes_is_zero_and_kl_is_nonnegative(make_model):
    lens_a, lens_b = Lens.from_model(load(make_model("qwen2", 0))), Lens.from_model(load(make_model("qwen2", 1)))
    h = torch.randn(20, 32) * 2
    stats = lens_statistics([h, h, h], [lens_a, lens_a, lens_b], [(0, 1), (0, 2), (2, 0)], top_k=4, tracked_ids=[])
    assert torch.equal(stats.kl_qn[0], torch.zeros(20))
    assert (stats.kl_qn[1:] > 0).all()


@pytest.mark.parametrize("arch", [*ARCHS, "gemma2"])
def test_norm_lens_at_last_layer_reproduces_model_logits(arch, make_model, tokenizer_dir):
    from transformers import AutoTokenizer

    overrides = {"final_logit_softcapping": 0.05} if arch == "gemma2" else {}
    model = load(make_model("gemma2" if arch == "gemma2" else arch, **overrides))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor([tok(PROMPTS[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    last_block_raw = []
    handle = model.get_decoder().layers[-1].register_forward_hook(
        lambda m, a, o: last_block_raw.append(o[0] if isinstance(o, tuple) else o)
    ) if hasattr(model.get_decoder(), "layers") else model.transformer.h[-1].register_forward_hook(
        lambda m, a, o: last_block_raw.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    lens = Lens.from_model(model)
    normed = lens.apply_norm(last_block_raw[0][0])
    torch.testing.assert_close(normed, out.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lens.logits(normed), out.logits[0], atol=1e-5, rtol=1e-5)
    assert final_norm(model) is not None


@pytest.mark.parametrize("largest", [True, False])
def test_segment_topk_equals_topk(largest):
    from capture.lens.vocab_chunks import TOPK_SEGMENT, _chunk_topk

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 40 * TOPK_SEGMENT, generator=gen)
    x[:8, 3 * TOPK_SEGMENT:3 * TOPK_SEGMENT + 20] += 50 if largest else -50  # every winner in one segment
    x[8:16, ::TOPK_SEGMENT] += 50 if largest else -50  # every winner in its own segment
    for width in (x.shape[1], 35 * TOPK_SEGMENT, 1000):  # segments, segments, plain topk
        want = x[:, :width].topk(20, dim=1, largest=largest)
        got = _chunk_topk(x[:, :width].contiguous(), 20, largest)
        assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices), width


@pytest.mark.slow  # compiles the fused reductions once per session (~20 s on the CPU)
def test_fused_statistics_match_plain_reference():
    # Chunks of 512 = 4 segments of 128 with top_k 1; the last chunk (1100 - 1024 = 76) takes the eager path.
    (lens_l, lens_r), gen = _random_lenses(1100, 16, 2)
    h_l = torch.randn(5, 16, generator=gen) * 2
    h_r = h_l + 0.7 * torch.randn(5, 16, generator=gen)
    stats = lens_statistics([h_l, h_r], [lens_l, lens_r], [(0, 1)], top_k=1, tracked_ids=[4], vocab_chunk=512,
                            backend="fused")
    for n in range(h_l.shape[0]):
        ref = ref_position(h_l[n], h_r[n], lens_l.weight_vd, lens_r.weight_vd, 1, [4])
        assert _close(float(stats.entropy_pn[0, n]), ref["entropy_l"])
        assert _close(float(stats.entropy_pn[1, n]), ref["entropy_r"])
        assert _close(float(stats.kl_qn[0, n]), ref["kl"], abs_=1e-6)
        assert stats.rise_id_qnk[0, n].tolist() == ref["rise"] and stats.fall_id_qnk[0, n].tolist() == ref["fall"]
        assert stats.topk_id_pnk[0, n].tolist() == ref["top_l"]
        assert _close(float(stats.rise_shift_qnk[0, n, 0]), ref["rise_val"][0], abs_=1e-5)
        assert _close(float(stats.topk_logit_pnk[0, n, 0]), ref["top_l_val"][0], abs_=1e-5)


@pytest.mark.slow
def test_fused_path_choice_and_identical_passes():
    from capture.lens.vocab_chunks import segment_selectable

    assert segment_selectable(4096, 7) and not segment_selectable(2048, 7)
    assert not segment_selectable(808, 7) and not segment_selectable(4100, 1)
    lenses, gen = _random_lenses(9000, 24, 1)
    h = torch.randn(33, 24, generator=gen) * 3
    same = lens_statistics([h, h], [lenses[0], lenses[0]], [(0, 1)], 7, [], vocab_chunk=4096, backend="fused")
    assert torch.equal(same.kl_qn, torch.zeros_like(same.kl_qn))  # identical passes: exactly no divergence


def test_a_failed_compilation_falls_back_to_the_eager_path(monkeypatch):
    def no_compiler(graph, inputs):
        raise RuntimeError("no C++ compiler here")

    lens_fused = _fresh_fused_state(monkeypatch)
    monkeypatch.setattr(lens_fused, "compiled", lambda: tuple(
        torch.compile(f, backend=no_compiler) for f in (lens_fused._pass_reductions, lens_fused._pair_reductions)))
    lenses, gen = _random_lenses(9000, 24, 1)
    h = [torch.randn(33, 24, generator=gen) * 3 for _ in range(2)]
    args = (h, lenses, [(0, 1)], 7, [3])
    with pytest.warns(UserWarning, match="could not be compiled .*no C\\+\\+ compiler here.*eager"):
        got = lens_statistics(*args, vocab_chunk=4096, backend="fused")
    want = lens_statistics(*args, vocab_chunk=4096, backend="kernels")
    assert torch.equal(got.topk_id_pnk, want.topk_id_pnk) and torch.equal(got.rise_id_qnk, want.rise_id_qnk)
    torch.testing.assert_close(got.kl_qn, want.kl_qn, rtol=1e-6, atol=1e-6)
    assert not lens_fused.available(torch.device("cpu"))  # the rest of the run stays eager


def _fresh_fused_state(monkeypatch):
    from capture.lens import cuda_fused

    monkeypatch.setattr(cuda_fused, "_BROKEN", [])
    monkeypatch.setattr(cuda_fused, "_CHECKED", set())
    return cuda_fused


@pytest.mark.slow  # compiles the fused reductions (~20 s on the CPU)
@pytest.mark.parametrize("top_k", [7, 40])
def test_every_chunk_runs_fused_on_a_ragged_vocabulary_and_a_large_top_k(top_k, monkeypatch):
    """9,001 entries (not whole segments) and a top-k above 32: no chunk takes the eager path, the numbers are
    the kernels'; the self-check of the first block agrees, so nothing is said."""
    import warnings

    from capture.lens.vocab_chunks import ChunkState

    cuda_fused = _fresh_fused_state(monkeypatch)
    eager_chunks = []
    original = ChunkState.add_chunk
    monkeypatch.setattr(ChunkState, "add_chunk", lambda self, z, start: (eager_chunks.append(start),
                                                                         original(self, z, start))[1])
    lenses, gen = _random_lenses(9001, 24, 2)
    h = [torch.randn(33, 24, generator=gen) * 3 for _ in range(3)]
    args = (h, [lenses[0], lenses[1], lenses[0]], [(0, 1), (0, 2), (1, 2)], top_k, [3, 9000])
    cuda_fused._CHECKED.add("cpu")  # the self-check's eager block is tested below
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = lens_statistics(*args, vocab_chunk=4096, backend="fused")
    assert eager_chunks == []
    a = lens_statistics(*args, vocab_chunk=4096, backend="kernels")
    for field in ("topk_id_pnk", "rise_id_qnk", "fall_id_qnk"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    for field in ("entropy_pn", "lse_pn", "topk_logit_pnk", "kl_qn", "rise_shift_qnk", "fall_shift_qnk", "tracked_pnj"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-6, atol=1e-6, msg=field)


def _wrong_backend(graph, inputs):
    """A compiler whose kernels return sums 1% off: what a miscompiled kernel on an unseen GPU could do."""

    def run(*args):
        out = graph(*args)
        return [o * 1.01 if isinstance(o, torch.Tensor) and o.dtype == torch.float64 else o for o in out]

    return run


def test_the_self_check_catches_wrong_compiled_numbers_and_goes_on_eagerly(monkeypatch):
    cuda_fused = _fresh_fused_state(monkeypatch)
    monkeypatch.setattr(cuda_fused, "compiled", lambda: tuple(
        torch.compile(f, backend=_wrong_backend) for f in (cuda_fused._pass_reductions, cuda_fused._pair_reductions)))
    lenses, gen = _random_lenses(9000, 24, 1)
    h = [torch.randn(33, 24, generator=gen) * 3 for _ in range(2)]
    args = (h, lenses, [(0, 1)], 7, [3])
    with pytest.warns(UserWarning, match=r"disagree with the eager ones on cpu \(softmax sum at \(0, 0\): "
                                         r"[0-9.e+-]+ compiled, [0-9.e+-]+ eager\)"):
        got = lens_statistics(*args, vocab_chunk=4096, backend="fused")
    want = lens_statistics(*args, vocab_chunk=4096, backend="kernels")
    torch.testing.assert_close(got.entropy_pn, want.entropy_pn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.kl_qn, want.kl_qn, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.topk_id_pnk, want.topk_id_pnk)
    assert not cuda_fused.available(torch.device("cpu"))  # the rest of the run is eager, and says nothing more
    again = lens_statistics(*args, vocab_chunk=4096, backend="fused")
    torch.testing.assert_close(again.kl_qn, want.kl_qn, rtol=1e-6, atol=1e-6)


def test_an_error_when_a_compiled_kernel_runs_falls_back_with_the_state_untouched(monkeypatch):
    """Not only a compiler failure: an exception of the compiled call itself (a Triton launch error) too."""
    cuda_fused = _fresh_fused_state(monkeypatch)
    calls = []

    def fails_on_second_call(graph, inputs):
        def run(*args):
            calls.append(1)
            if len(calls) == 2:  # the pair reductions of the first chunk: the pass reductions already ran
                raise ValueError("triton launch failed")
            return graph(*args)

        return run

    monkeypatch.setattr(cuda_fused, "compiled", lambda: tuple(
        torch.compile(f, backend=fails_on_second_call)
        for f in (cuda_fused._pass_reductions, cuda_fused._pair_reductions)))
    cuda_fused._CHECKED.add("cpu")
    lenses, gen = _random_lenses(9000, 24, 1)
    h = [torch.randn(33, 24, generator=gen) * 3 for _ in range(2)]
    args = (h, lenses, [(0, 1)], 7, [3])
    with pytest.warns(UserWarning, match="ValueError: triton launch failed"):
        got = lens_statistics(*args, vocab_chunk=4096, backend="fused")
    want = lens_statistics(*args, vocab_chunk=4096, backend="kernels")
    torch.testing.assert_close(got.kl_qn, want.kl_qn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.entropy_pn, want.entropy_pn, rtol=1e-6, atol=1e-6)
    assert torch.equal(got.rise_id_qnk, want.rise_id_qnk)


@pytest.mark.parametrize("vocab", [10240, 9001])
def test_the_eager_fallback_and_self_check_on_a_narrower_last_chunk(vocab, monkeypatch):
    """The eager path of the fused backend (a failed compilation, the self-check's eager block) on a last chunk
    narrower than the others, whole segments (10,240 = 2 x 4,096 + 2,048: selected by segments in a view of the
    wider buffer) or not (9,001)."""
    cuda_fused = _fresh_fused_state(monkeypatch)
    cuda_fused._BROKEN.append("as if compilation had failed")
    lenses, gen = _random_lenses(vocab, 24, 3)
    h = [torch.randn(17, 24, generator=gen) * 3 for _ in range(2)]
    args = (h, lenses, [(0, 1)], 4, [3])
    got = lens_statistics(*args, vocab_chunk=4096, backend="fused")
    want = lens_statistics(*args, vocab_chunk=4096, backend="kernels")
    assert torch.equal(got.topk_id_pnk, want.topk_id_pnk) and torch.equal(got.fall_id_qnk, want.fall_id_qnk)
    torch.testing.assert_close(got.kl_qn, want.kl_qn, rtol=1e-6, atol=1e-6)
