"""Prompts: reading them, and turning them into token ids the way the store records them.

Order follows the legacy tool: every prompts-file line first, then inline prompts.
Tokenisation adds no special tokens unless ``add_bos`` or ``chat_template`` asks for
them, so a plain capture sees exactly the text's tokens.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from store.errors import EmptyPrompt, NoPrompts, PromptTooLong, UsageError

DEV_PROMPTS_FILE = Path(__file__).parent / "data" / "dev_prompts.txt"


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; a trailing newline is fine, an empty line in between is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"prompts file {str(path)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompts file {str(path)!r}: {exc}; it must be UTF-8 text") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise NoPrompts(where=f" in {str(path)!r}")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise EmptyPrompt(index=number - 1, where=f"(line {number} of {str(path)!r}) ")
    return lines


def collect_prompts(prompts_files: list[str] | None = None, inline: list[str] | None = None) -> list[str]:
    """File prompts first (in file order), then inline prompts; the dev prompts when neither is given."""
    prompts = [p for f in prompts_files or [] for p in read_prompts_file(f)]
    for index, text in enumerate(inline or []):
        if not text.strip():
            raise EmptyPrompt(index=len(prompts) + index, where="(from --prompt) ")
    prompts += list(inline or [])
    return prompts or read_prompts_file(DEV_PROMPTS_FILE)


@dataclass
class TokenizedPrompts:
    """Token ids and raw token pieces per prompt (ragged: each prompt keeps its length)."""

    texts: list[str]
    ids: list[list[int]]
    pieces: list[list[str]] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [len(i) for i in self.ids]


def tokenize_prompts(
    tokenizer,
    texts: list[str],
    *,
    add_bos: bool = False,
    chat_template: bool = False,
    max_tokens: int | None = None,
    truncate: bool = False,
    limit_reason: str = "--max-tokens",
) -> TokenizedPrompts:
    """Tokenise prompts for capture; too-long prompts are an error unless ``truncate``."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UsageError("--chat-template was given but the tokenizer has no chat template; drop the flag")
    if add_bos and tokenizer.bos_token_id is None:
        raise UsageError("--add-bos was given but the tokenizer has no BOS token; drop the flag")
    all_ids: list[list[int]] = []
    for index, text in enumerate(texts):
        if chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if add_bos and (not ids or ids[0] != tokenizer.bos_token_id):
            ids.insert(0, tokenizer.bos_token_id)
        if not ids:
            raise EmptyPrompt(index=index, where="(it has no tokens) ")
        if max_tokens is not None and len(ids) > max_tokens:
            if not truncate:
                raise PromptTooLong(index=index, n=len(ids), limit=max_tokens, why=limit_reason)
            warnings.warn(f"prompt {index} truncated from {len(ids)} to {max_tokens} tokens", stacklevel=2)
            ids = ids[:max_tokens]
        all_ids.append(ids)
    pieces = [list(tokenizer.convert_ids_to_tokens(ids)) for ids in all_ids]
    return TokenizedPrompts(texts=list(texts), ids=all_ids, pieces=pieces)


def resolve_tracked(tokenizer, specs: list[str] | None, vocab_rows: int) -> tuple[list[int], list[str]]:
    """Tracked tokens from ``--track`` values: tokenizer pieces (``ĠYes``) or integer ids.

    Returned sorted by id without duplicates. An unknown piece is an error that lists
    the closest pieces; it is never dropped silently.
    """
    import difflib

    vocab = tokenizer.get_vocab()
    ids: set[int] = set()
    for spec in specs or []:
        text = str(spec)
        if text.lstrip("-").isdigit():
            token_id = int(text)
            if not 0 <= token_id < vocab_rows:
                raise UsageError(f"tracked token id {token_id} is outside the vocabulary (0..{vocab_rows - 1})")
        elif text in vocab:
            token_id = vocab[text]
        else:
            close = difflib.get_close_matches(text, list(vocab), n=5, cutoff=0.6)
            hint = f"; closest pieces: {', '.join(repr(c) for c in close)}" if close else ""
            raise UsageError(f"tracked token {text!r} is not a piece of the tokenizer{hint}; spell it as the "
                             "tokenizer does (e.g. 'ĠYes' for ' Yes' in byte-level BPE) or give its id")
        ids.add(token_id)
    ordered = sorted(ids)
    return ordered, [str(p) if p is not None else "" for p in tokenizer.convert_ids_to_tokens(ordered)]


def normalize_lengths(tokenizer, tokenized: TokenizedPrompts) -> tuple[TokenizedPrompts, str | None]:
    """Cut every prompt to the shortest prompt's token count (``--normalize-length``).

    The cut is made on token ids (no decode and re-encode, so every prompt ends up with
    exactly that many tokens); the stored text becomes the decoded kept tokens.
    Returns the prompts and a message saying what changed (None when nothing did).
    """
    lengths = tokenized.lengths
    target = min(lengths)
    if target == max(lengths):
        return tokenized, None
    ids = [seq[:target] for seq in tokenized.ids]
    texts = [tokenizer.decode(seq) if len(seq) < n else text
             for seq, n, text in zip(ids, lengths, tokenized.texts, strict=True)]
    pieces = [p[:target] for p in tokenized.pieces]
    message = f"normalized prompt lengths to {target} tokens (previous max length {max(lengths)} tokens)"
    return TokenizedPrompts(texts=texts, ids=ids, pieces=pieces), message
