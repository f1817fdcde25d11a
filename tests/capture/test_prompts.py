from __future__ import annotations

import pytest

from capture.inputs.prompts import DEV_PROMPTS_FILE, collect_prompts, tokenize_prompts
from capture.inputs.sources import read_prompts_file
from store.errors import UsageError


def test_default_is_the_four_dev_prompts():
    prompts, rows = collect_prompts()
    assert rows == [0, 1, 2, 3] and len(prompts) == 4 and prompts[0].startswith("Explain the moon landing")
    assert prompts == DEV_PROMPTS_FILE.read_text().splitlines()


def test_files_first_then_inline(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\ntwo\n")
    assert collect_prompts([str(f)], ["three"]) == (["one", "two", "three"], [0, 1, 2])
    assert collect_prompts(None, ["x"]) == (["x"], [0])


def test_shuffle_then_limit_samples_and_keeps_source_rows(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("".join(f"prompt {i}\n" for i in range(10)))
    prompts, rows = collect_prompts([str(f)], shuffle=True, seed=3, limit=4)
    assert len(prompts) == 4 and rows != [0, 1, 2, 3] and prompts == [f"prompt {r}" for r in rows]
    assert collect_prompts([str(f)], shuffle=True, seed=3, limit=4) == (prompts, rows)
    assert collect_prompts([str(f)], shuffle=True, seed=4, limit=4)[1] != rows
    with pytest.raises(UsageError, match="--limit must be at least 1"):
        collect_prompts([str(f)], limit=0)


def test_empty_line_and_empty_file_are_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\n")
    with pytest.raises(UsageError, match=r"prompt 1 \(line 2 of"):
        read_prompts_file(f)
    f.write_text("\n")
    with pytest.raises(UsageError, match="no prompts to capture"):
        read_prompts_file(f)
    with pytest.raises(UsageError, match="does not exist"):
        read_prompts_file(tmp_path / "missing.txt")
    with pytest.raises(UsageError, match="is empty"):
        collect_prompts(None, ["ok", "  "])


def test_tokenize_limits_and_bos(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "The quick brown fox jumps over the lazy dog."
    plain = tokenize_prompts(tok, [text])
    assert plain.ids[0] == tok(text, add_special_tokens=False)["input_ids"]
    assert plain.pieces[0] == tok.convert_ids_to_tokens(plain.ids[0])
    with_bos = tokenize_prompts(tok, [text], add_bos=True)
    assert with_bos.ids[0] == [tok.bos_token_id, *plain.ids[0]]
    n = len(plain.ids[0])
    with pytest.raises(UsageError, match=f"prompt 0 has {n} tokens, more than the limit of 3"):
        tokenize_prompts(tok, [text], max_tokens=3)
    with pytest.warns(UserWarning, match="truncated"):
        assert tokenize_prompts(tok, [text], max_tokens=3, truncate=True).lengths == [3]
    with pytest.raises(UsageError, match="no chat template"):
        tokenize_prompts(tok, [text], chat_template="always")


def test_resolve_tracked_pieces_and_ids(tokenizer_dir):
    from transformers import AutoTokenizer

    from capture.inputs.prompts import resolve_tracked

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    the = tok.convert_tokens_to_ids("Ġthe")
    ids, strs = resolve_tracked(tok, ["Ġthe", "7", str(the)], vocab_rows=320)
    assert ids == sorted({the, 7}) and strs == tok.convert_ids_to_tokens(ids)
    with pytest.raises(UsageError, match=r"tracked token 'Ġthee' is not a piece.*closest pieces: 'Ġthe'"):
        resolve_tracked(tok, ["Ġthee"], vocab_rows=320)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        resolve_tracked(tok, ["320"], vocab_rows=320)
