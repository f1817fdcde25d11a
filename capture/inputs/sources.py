"""Prompts from files and datasets: one per line, JSON lines, JSON, CSV, Parquet, a saved ``datasets`` directory.

A prompt is a text, or a chat conversation: a list of ``{"role", "content"}`` dicts
(a ``messages`` field), which the tokenizer's chat template renders. Rows are checked
as they are read; a bad row (missing field, empty text, wrong type) is a one-line
error naming the file, the row (1-based) and the field, before anything is written.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from capture.errors import BadPromptRow, EmptyPrompt, NoPrompts
from store.errors import UsageError

Prompt = str | list  # a text, or a conversation: list of {"role", "content"} dicts
TEXT_FIELDS = ("text", "prompt")  # tried in this order when no --field is given
CHAT_FIELD = "messages"
SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")


def _check_conversation(messages: list, path: Path, row: int, field: str) -> list[dict]:
    if not messages:
        raise BadPromptRow(path=path, row=row, field=field, problem="the conversation has no messages")
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or \
                not isinstance(turn.get("content"), str):
            raise BadPromptRow(path=path, row=row, field=field,
                               problem=f"every message must be a dict with string role and content, got {turn!r}"[:200])
        if not turn["content"].strip():
            raise BadPromptRow(path=path, row=row, field=field, problem=f"a {turn['role']} message is empty")
    for turn in messages:
        _check_unicode(turn["content"], path, row, field)
    return [{"role": turn["role"], "content": turn["content"]} for turn in messages]


def _prompt_of(record, path: Path, row: int, field: str | None) -> Prompt:
    """The prompt in one record (a dict of fields, or a bare string)."""
    if isinstance(record, str) and field is None:
        value, name = record, "text"
    elif isinstance(record, dict):
        if field is not None:
            name = field
        else:
            name = next((f for f in (*TEXT_FIELDS, CHAT_FIELD) if f in record), None)
            if name is None:
                raise BadPromptRow(path=path, row=row, field="text", problem=(
                    f"it has none of the fields {', '.join((*TEXT_FIELDS, CHAT_FIELD))} (fields: "
                    f"{', '.join(map(str, record))})"))
        if name not in record:
            raise BadPromptRow(path=path, row=row, field=name,
                               problem=f"the field is missing (fields: {', '.join(map(str, record))})")
        value = record[name]
    else:
        raise BadPromptRow(path=path, row=row, field=field or "text",
                           problem=f"a row must be an object with fields, got {type(record).__name__}")
    if hasattr(value, "tolist"):  # numpy / pyarrow values from Parquet and datasets
        value = value.tolist()
    if isinstance(value, list):
        return _check_conversation(value, path, row, name)
    if name == CHAT_FIELD:
        raise BadPromptRow(path=path, row=row, field=name, problem=(
            f"a conversation must be a list of {{\"role\", \"content\"}} turns, got {type(value).__name__}"))
    if not isinstance(value, str):
        raise BadPromptRow(path=path, row=row, field=name,
                           problem=f"expected text or a list of messages, got {type(value).__name__}")
    if not value.strip():
        raise BadPromptRow(path=path, row=row, field=name, problem="the text is empty")
    _check_unicode(value, path, row, name)
    return value


def _check_unicode(text: str, path: Path, row: int, field: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as JSON's ``\\ud800``): tokenizers cannot
    encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadPromptRow(path=path, row=row, field=field, problem=(
            f"the text holds an unpaired surrogate ({text[exc.start]!r} at character {exc.start}), which is not "
            "valid Unicode")) from None


def _json_rows(path: Path) -> Iterator[object]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    raise BadPromptRow(path=path, row=number, field="-", problem="the line is empty")
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    raise BadPromptRow(path=path, row=number, field="-", problem=f"not JSON ({exc})") from None
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); give a list of objects, or use .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UsageError(f"{path} must hold a JSON list of prompts (objects or strings), got {type(data).__name__}")
    yield from data


def _table_rows(path: Path) -> Iterable[dict]:
    if path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, strict=True)  # strict: an unterminated quote is an error, not a long row
            try:
                yield from reader
            except csv.Error as exc:
                raise BadPromptRow(path=path, row=max(1, reader.line_num - 1), field="-",
                                   problem=f"not valid CSV ({exc})") from None
        return
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pyarrow.ArrowException, OSError) as exc:
        raise UsageError(f"cannot read prompts file {str(path)!r} as Parquet: {str(exc).splitlines()[0]}; check "
                         "that it is a whole Parquet file") from None
    yield from table.to_pylist()


def _dataset_rows(path: Path) -> Iterable[dict]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"{path} is a directory: reading a saved dataset needs the `datasets` package "
                         "(pip install datasets)") from None
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise UsageError(f"{path} is a directory but not a dataset saved with `save_to_disk`; give a file "
                         f"({', '.join(SUFFIXES)}) or a saved dataset") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise UsageError(f"{path} holds several splits ({', '.join(data)}); save one split, or give its "
                             f"directory ({path}/{next(iter(data))})")
        data = next(iter(data.values()))
    return iter(data)


def _text_lines(path: Path) -> Iterator[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not any(line.strip() for line in lines):
        raise NoPrompts(where=f" in {str(path)!r}")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise EmptyPrompt(index=number - 1, where=f"(line {number} of {str(path)!r}) ")
        yield line


def read_prompts_file(path: str | Path, field: str | None = None) -> list[Prompt]:
    """Every prompt of a file or saved dataset, in order (see the module docstring for the formats).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> _ = p.write_text('{"text": "Hi."}\\n{"messages": [{"role": "user", "content": "Why?"}]}\\n')
    >>> read_prompts_file(p)
    ['Hi.', [{'role': 'user', 'content': 'Why?'}]]
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"prompts file {str(path)!r} does not exist; check the path")
    try:
        if path.is_dir():
            rows: Iterable = _dataset_rows(path)
        elif path.suffix in (".jsonl", ".json"):
            rows = _json_rows(path)
        elif path.suffix in (".csv", ".parquet"):
            rows = _table_rows(path)
        elif path.suffix in (".txt", ""):
            if field is not None:
                raise UsageError(f"--field {field!r} does not apply to the text file {path} (one prompt per line)")
            return list(_text_lines(path))
        else:
            raise UsageError(f"prompts file {path} has an unknown suffix {path.suffix!r}; use one of "
                             f"{', '.join(SUFFIXES)} or a directory saved by `datasets`")
        prompts = [_prompt_of(record, path, row, field) for row, record in enumerate(rows, start=1)]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompts file {str(path)!r}: {exc}; it must be UTF-8") from None
    if not prompts:
        raise NoPrompts(where=f" in {str(path)!r}")
    return prompts
