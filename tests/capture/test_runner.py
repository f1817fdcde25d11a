"""run_passes: batches placed in write groups (at once, or one behind their launch as on CUDA); the non-finite check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capture.errors import NonFiniteActivation
from capture.inputs.prompts import TokenizedPrompts
from capture.inputs.selection import StoredWindow
from capture.models.transfer import DeviceToHost
from capture.pipeline import runner
from capture.pipeline.runner import forward_residuals, run_passes
from capture.plan.batching import compute_batches
from capture.plan.passes import Pass
from store.errors import UsageError
from tests.helpers import load

# Store order: longest first; labels are source positions.
IDS = [[5, 9, 13, 2, 7, 11], [3, 4, 8, 6, 1], [10, 12, 14], [15, 16, 17], [18, 19], [20]]
LABELS = [4, 0, 5, 1, 3, 2]
PASSES = [(0, Pass("BB", "base", "base", "base")), (2, Pass("SB", "base", "sft", "base"))]


def _alone(llm, embedding, seq, layers):
    resid, final = forward_residuals(llm, embedding, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long),
                                     keep_layers=layers)
    return resid[0].numpy(), final[0].numpy()


def _run(llm, embeddings, window, groups, **extra):
    prompts = TokenizedPrompts(texts=[""] * len(IDS), ids=IDS, labels=LABELS)
    options = dict(batch_size=2, batch_tokens=1000, out_dtype=torch.float32, pad_id=0) | extra
    extent = lambda g: max(window.lengths[g])  # noqa: E731 - the group's longest stored window
    return list(run_passes(llm, PASSES, embeddings, prompts, groups, window, token_extent=extent, **options))


class _OneBehind(DeviceToHost):
    """The CUDA schedule on the CPU: each batch placed only after the next one is launched."""

    def __init__(self, device):
        super().__init__(device)
        self.in_flight = 1


def _run_released(llm, embeddings, window, groups, **extra):
    """As the capture job consumes groups: each copied out (as written) and released, its buffers reused."""
    prompts = TokenizedPrompts(texts=[""] * len(IDS), ids=IDS, labels=LABELS)
    options = dict(batch_size=2, batch_tokens=1000, out_dtype=torch.float32, pad_id=0) | extra
    extent = lambda g: max(window.lengths[g])  # noqa: E731 - the group's longest stored window
    got, buffers = [], set()
    for group in run_passes(llm, PASSES, embeddings, prompts, groups, window, token_extent=extent, **options):
        buffers |= {id(group.resid_gltd.base), id(group.final_gtd.base)}
        got.append(runner.CapturedGroup(group.pass_index, group.prompts, group.resid_gltd.copy(),
                                        group.final_gtd.copy(), group.n_real_tokens))
        group.release()
    assert len(buffers) <= 4 < 2 * len(got), "released buffers are reused"
    return got


@pytest.mark.parametrize("schedule", ["cpu", "one behind", "placed behind", "released buffers"])
@pytest.mark.parametrize("batch_size", [1, 2, 8])
@pytest.mark.parametrize("positions", ["all", "last:2"])
def test_groups_equal_prompts_run_alone(make_model, batch_size, positions, schedule, monkeypatch):
    if schedule in ("one behind", "placed behind"):
        monkeypatch.setattr(runner, "DeviceToHost", _OneBehind)
    llm, other = load(make_model("llama", 0)), load(make_model("llama", 1))
    embeddings = {"base": llm.get_input_embeddings(), "sft": other.get_input_embeddings()}
    layers = [0, 2]
    n = [len(i) for i in IDS]
    start = [0] * len(IDS) if positions == "all" else [max(0, k - 2) for k in n]
    window = StoredWindow(start=start, stop=n, layers=layers)
    groups = [slice(0, 2), slice(2, 5), slice(5, 6)]
    if schedule == "released buffers":
        got = _run_released(llm, embeddings, window, groups, batch_size=batch_size)
    else:
        got = _run(llm, embeddings, window, groups, batch_size=batch_size, place_behind=schedule == "placed behind")
    assert [(g.pass_index, g.prompts) for g in got] == [(p, g) for p, _ in PASSES for g in groups]
    for captured in got:
        embedding = embeddings[dict(PASSES)[captured.pass_index].embedding]
        assert captured.n_real_tokens == sum(b - a for a, b in zip(start[captured.prompts], n[captured.prompts],
                                                                   strict=True))
        for row, prompt in enumerate(range(captured.prompts.start, captured.prompts.stop)):
            resid, final = _alone(llm, embedding, IDS[prompt], layers)
            a, b = start[prompt], n[prompt]
            np.testing.assert_allclose(captured.resid_gltd[row, :, : b - a], resid[:, a:b], atol=1e-5, rtol=0)
            np.testing.assert_allclose(captured.final_gtd[row, : b - a], final[a:b], atol=1e-5, rtol=0)
            assert np.isnan(captured.resid_gltd[row, :, b - a:]).all()
            assert np.isnan(captured.final_gtd[row, b - a:]).all()


def _with_huge_token(make_model, token: int):
    llm = load(make_model("llama", 0))
    with torch.no_grad():
        llm.get_input_embeddings().weight[token] = 1e9  # finite in float32, inf once stored as float16
    return llm


def test_non_finite_names_the_pass_prompt_true_layer_and_position(make_model):
    llm = _with_huge_token(make_model, 8)  # IDS[1][2]: store row 1, source prompt 0, position 2
    embeddings = {"base": llm.get_input_embeddings(), "sft": llm.get_input_embeddings()}
    n = [len(i) for i in IDS]
    window = StoredWindow(start=[0] * len(IDS), stop=n, layers=[1, 2])
    with pytest.raises(NonFiniteActivation, match=r"pass BB, prompt 0, layer 1, position 2 \(inf\)"):
        _run(llm, embeddings, window, [slice(0, 2), slice(2, 6)], out_dtype=torch.float16)


def test_non_finite_raised_from_the_placement_thread(make_model, monkeypatch):
    monkeypatch.setattr(runner, "DeviceToHost", _OneBehind)
    llm = _with_huge_token(make_model, 8)
    embeddings = {"base": llm.get_input_embeddings(), "sft": llm.get_input_embeddings()}
    window = StoredWindow(start=[0] * len(IDS), stop=[len(i) for i in IDS], layers=[1, 2])
    with pytest.raises(NonFiniteActivation, match=r"pass BB, prompt 0, layer 1, position 2 \(inf\)"):
        _run(llm, embeddings, window, [slice(0, 2), slice(2, 6)], out_dtype=torch.float16, place_behind=True)


def test_non_finite_padding_is_not_an_error(make_model):
    llm = _with_huge_token(make_model, 0)  # the pad id: only padding positions overflow
    embeddings = {"base": llm.get_input_embeddings(), "sft": llm.get_input_embeddings()}
    n = [len(i) for i in IDS]
    window = StoredWindow(start=[0] * len(IDS), stop=n, layers=[0, 1])
    got = _run(llm, embeddings, window, [slice(0, 6)], batch_size=6, out_dtype=torch.float16)
    assert all(np.isfinite(g.resid_gltd[0]).all() for g in got)  # the longest prompt has no padding
    assert sum(np.isfinite(g.resid_gltd[:, 0, :, 0]).sum() for g in got) == 2 * sum(n)


@pytest.mark.parametrize("max_padding", [0.0, 0.05, 0.3])
def test_batches_pad_at_most_the_allowed_share(max_padding):
    rng = np.random.default_rng(0)
    lengths = sorted((int(x) for x in rng.lognormal(3.5, 1.0, 500) + 1), reverse=True)
    batches = compute_batches(lengths, slice(0, len(lengths)), 64, 8192, max_padding)
    assert [i for b in batches for i in range(b.start, b.stop)] == list(range(len(lengths)))
    for b in batches:
        part = lengths[b]
        assert len(part) == 1 or len(part) * max(part) <= (1 + max_padding) * sum(part) + 1e-9
        assert len(part) <= 64 and (len(part) == 1 or len(part) * max(part) <= 8192)
    padded = sum((b.stop - b.start) * lengths[b.start] for b in batches)
    assert padded <= (1 + max_padding) * sum(lengths)


def test_default_batch_padding_follows_the_device():
    from capture.settings import CaptureSettings, resolve_models

    assert CaptureSettings().padding_for("cpu") == 0.05 and CaptureSettings().padding_for("cuda:1") == 0.15
    assert CaptureSettings(batch_padding=0.5).padding_for("cpu") == 0.5
    with pytest.raises(UsageError, match="--batch-padding must be 0 or more"):
        resolve_models(CaptureSettings(batch_padding=-0.1))


class _LargestTemporary:
    """Records the largest tensor any operation creates (a torch dispatch mode: every op, C++ included)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:  # not a view
                        outer.largest = max(outer.largest, t.untyped_storage().nbytes())
                return out

        self.largest, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_non_finite_check_finds_the_first_bad_entry_with_small_temporaries():
    from capture.pipeline.runner import _first_non_finite

    resid_bltd = torch.full((3, 4, 5, 64), 60000.0, dtype=torch.float16)  # finite; its sums overflow float16
    real_bt = torch.ones(3, 5, dtype=torch.bool)
    real_bt[2, 3:] = False
    with _LargestTemporary() as seen:
        found, vector = _first_non_finite(resid_bltd, real_bt)
    assert found[0] == 0
    assert seen.largest <= resid_bltd[..., 0].numel() * 2 + 64, "a temporary the size of the residuals"
    resid_bltd[2, 0, 4, 9] = float("nan")  # padding: not an error
    resid_bltd[1, 2, 3, 7] = float("-inf")
    resid_bltd[1, 3, 0, 0] = float("nan")  # later in C order
    found, vector = _first_non_finite(resid_bltd, real_bt)
    assert found.tolist() == [1, 1, 2, 3] and vector.shape == (64,) and vector[7] == float("-inf")
