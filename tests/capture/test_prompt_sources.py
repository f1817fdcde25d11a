"""Prompts from datasets: every format end to end, chat conversations with roles, and bad rows."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from capture.errors import BadPromptRow
from capture.inputs.sources import read_prompts_file
from cli import main
from store.errors import UsageError
from store.reader import open_store

TEXTS = ["The moon is bright tonight.", "Yes", "Write a poem about rivers."]
CHAT = [{"role": "user", "content": "Why is the sky blue?"}, {"role": "assistant", "content": "Light scatters."}]


def _write(tmp_path, kind: str, rows: list, field: str = "text"):
    path = tmp_path / f"prompts.{kind}" if kind != "datasets" else tmp_path / "saved"
    records = [{field: r, "id": i} for i, r in enumerate(rows)]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "csv":
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[field, "id"])
            writer.writeheader()
            writer.writerows(records)
    elif kind == "parquet":
        import pandas as pd

        pd.DataFrame(records).to_parquet(path)
    else:
        import datasets

        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "datasets"])
def test_every_format_reads_its_prompts_in_order(kind, tmp_path):
    assert read_prompts_file(_write(tmp_path, kind, TEXTS)) == TEXTS
    assert read_prompts_file(_write(tmp_path, kind, TEXTS, field="question"), field="question") == TEXTS


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "datasets"])
def test_conversations_are_read_as_messages(kind, tmp_path):
    path = _write(tmp_path, kind, [CHAT, CHAT[:1]], field="messages")
    assert read_prompts_file(path) == [CHAT, CHAT[:1]]


@pytest.mark.parametrize(("rows", "field", "words"), [
    ([{"text": "ok"}, {"other": "x"}], None, "row 2, field 'text': it has none of the fields"),
    ([{"text": "ok"}, {"text": "   "}], None, "row 2, field 'text': the text is empty"),
    ([{"text": "ok"}, {"text": 42}], None, "row 2, field 'text': expected text or a list of messages, got int"),
    ([{"q": "ok"}, {"text": "x"}], "q", "row 2, field 'q': the field is missing"),
    ([{"messages": [{"role": "user"}]}], None, "row 1, field 'messages': every message must be a dict"),
    ([{"messages": []}], None, "row 1, field 'messages': the conversation has no messages"),
])
def test_bad_rows_name_the_file_row_and_field(rows, field, words, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BadPromptRow, match=words) as info:
        read_prompts_file(path, field)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "x.yaml").write_text("a: b")
    with pytest.raises(UsageError, match=r"unknown suffix '\.yaml'"):
        read_prompts_file(tmp_path / "x.yaml")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(BadPromptRow, match="row 2, field '-': not JSON"):
        read_prompts_file(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(BadPromptRow, match=r"row 2.*the line is empty"):
        read_prompts_file(tmp_path / "empty.jsonl")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="not a dataset saved"):
        read_prompts_file(tmp_path / "dir")


def test_a_bad_row_writes_nothing(tiny_pair, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("text\nfine\n\"\"\n")
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--prompts-file", str(path), "--store", str(store),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: row 2, field 'text': the text is empty" in err and err.count("\n") == 1
    assert not store.exists()


def test_chat_conversations_get_roles_end_to_end(tiny_pair, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"text": "Plain text too."}) + "\n")
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--prompts-file", str(path), "--store", str(store),
                 "--quiet", "--no-lens", "--chat-template"]) == 0
    ds = open_store(store)
    chat = ds.sel(prompt=0)
    n = int(chat.n_tokens)
    roles, pieces = chat.role.values[:n].tolist(), chat.token_str.values[:n].tolist()
    assert set(roles) == {"user", "assistant", "template"} and "" not in roles
    assert "<|user|>" in [p for p, r in zip(pieces, roles, strict=True) if r == "template"]
    user_text = "".join(p for p, r in zip(pieces, roles, strict=True) if r == "user").replace("Ġ", " ")
    assert user_text.strip() == CHAT[0]["content"]
    plain = ds.sel(prompt=1)  # --chat-template wraps a text as a user turn: it gets roles too
    assert "user" in plain.role.values[: int(plain.n_tokens)].tolist()
    assert (chat.role.values[n:] == "").all()
    assert np.isfinite(chat.resid.sel(pass_="SS").values[:, :n]).all()
    assert ds.chat_templated.values.tolist() == [True, True] and ds.attrs["capture_settings"]["chat_template"] == \
        "always"


def test_plain_text_beside_chats_is_never_wrapped_by_default(tiny_pair, tmp_path, capsys):
    """A plain row in a set with chat rows keeps exactly its own tokens (the template renders conversations only),
    the store records which prompts were rendered, and the mix is said in one line."""
    from transformers import AutoTokenizer

    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"text": "Plain text too."}) + "\n")
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--prompts-file", str(path), "--store", str(store),
                 "--quiet", "--no-lens"]) == 0
    said = capsys.readouterr()
    assert "chat template applied to the 1 chat conversations only; the other 1 prompts are plain text" in \
        said.out + said.err
    ds = open_store(store)
    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    plain = ds.sel(prompt=1)
    n = int(plain.n_tokens)
    assert plain.token_id.values[:n].tolist() == tok("Plain text too.", add_special_tokens=False)["input_ids"]
    assert set(plain.role.values[:n].tolist()) == {"text"}
    assert ds.chat_templated.values.tolist() == [True, False]
    assert ds.attrs["capture_settings"]["chat_template"] == "auto"


def test_chat_template_never_refuses_conversations_before_any_load(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"messages": CHAT}) + "\n")
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tmp_path / "nowhere"), "--prompts-file", str(path), "--store",
                 str(store), "--quiet", "--chat-template", "never"]) == 2
    err = capsys.readouterr().err
    assert "--chat-template never, but prompt 1 is a chat conversation" in err and err.count("\n") == 1
    assert not store.exists() and not (tmp_path / "nowhere").exists()


def test_shuffle_and_limit_sample_a_dataset(tiny_pair, tmp_path):
    path = _write(tmp_path, "jsonl", [f"Prompt number {i}." for i in range(12)])
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--prompts-file", str(path), "--store", str(store),
                 "--quiet", "--no-lens", "--shuffle", "--seed", "5", "--limit", "4"]) == 0
    ds = open_store(store).sortby("prompt")
    rows = ds.prompt_index.values.tolist()
    assert len(rows) == 4 and rows != [0, 1, 2, 3]
    assert ds.prompt_text.values.tolist() == [f"Prompt number {i}." for i in rows]
