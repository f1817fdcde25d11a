"""The opening summary, generated from the numbers: stores with planted effects say what was planted."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from analysis import open_store
from analysis.report.summary import report_summary
from store.testing import fill_lens_statistics, write_tiny_store
from store.writer import consolidate

BB, BS, SB, SS = range(4)


def _planted(tmp_path, effect: str, from_layer: int = 0):
    """A store whose passes differ by a known direction: through the embeddings, the body, or the body from
    ``from_layer`` on only."""
    path = write_tiny_store(tmp_path / f"{effect}.zarr", n_prompts=4, n_layers1=5, hidden=8)
    group = zarr.open_group(str(path), mode="r+")
    bb = group["resid"][BB]
    delta = np.zeros_like(bb)
    delta[:, from_layer:] = 3.0  # NaN padding stays NaN in bb + delta
    changed = bb + delta
    if effect == "embedding":  # the SFT embeddings carry the change; the bodies agree
        group["resid"][BS], group["resid"][SB], group["resid"][SS] = bb, changed, changed
    else:  # the SFT body carries it; the embeddings agree
        group["resid"][SB], group["resid"][BS], group["resid"][SS] = bb, changed, changed
    consolidate(path)
    return path


def test_an_embedding_only_change_is_called_so(tmp_path):
    text = " ".join(report_summary(open_store(_planted(tmp_path, "embedding"))))
    assert "entirely through the input embeddings (the bodies compute the same)" in text
    assert "the embedding main effect 100%" in text


def test_a_body_only_change_is_called_so(tmp_path):
    text = " ".join(report_summary(open_store(_planted(tmp_path, "body"))))
    assert "entirely through the body (the input embeddings are identical)" in text
    assert "the body main effect carries 100%" in text and "Nothing changes before" not in text


def test_a_late_layer_change_says_where_it_enters(tmp_path):
    sentences = report_summary(open_store(_planted(tmp_path, "body", from_layer=3)))
    assert 3 <= len(sentences) <= 5
    assert "Nothing changes before layer 3 (BB and SS are identical there)" in sentences[1]
    assert "first reaches half its largest value at layer 3" in sentences[1]


def test_the_output_sentence_needs_finished_lens_statistics(tmp_path):
    from store.completeness import usable

    path = _planted(tmp_path, "body")
    plain = report_summary(usable(open_store(path))[0])
    assert "What this does to the output is not shown: this store has no lens statistics." in plain
    fill_lens_statistics(path)
    with_lens = " ".join(report_summary(open_store(path)))
    assert "under the norm lens, KL(SS || BB) averages" in with_lens and "shift rate" in with_lens
    zarr.open_group(str(path), mode="r+")["lens_done"][1] = False  # a capture that stopped in its lens stage
    ds, notes = usable(open_store(path))
    assert "kl" not in ds and "unfinished, 3 of 4 prompts done" in notes[0]
    assert "its lens statistics are unfinished (3 of 4 prompts done" in " ".join(report_summary(ds))


@pytest.mark.parametrize("massive", [0, 7])
def test_massive_positions_are_counted(tmp_path, massive):
    text = " ".join(report_summary(open_store(_planted(tmp_path, "body")), n_massive=massive))
    said = "7 massive-activation positions (attention sinks) are left out of the residual numbers"
    assert (said in text) == bool(massive)
