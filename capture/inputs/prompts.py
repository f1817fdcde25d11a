"""Prompts: reading them, and turning them into token ids the way the store records them.

Order follows the legacy tool: every prompts-file line first, then inline prompts.
Tokenisation adds no special tokens unless ``add_bos`` or the chat template asks for
them, so a plain capture sees exactly the text's tokens; the chat template renders chat
conversations only, unless ``--chat-template always`` wraps plain texts too.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from capture.errors import EmptyPrompt, PromptTooLong
from capture.inputs.sources import Prompt, read_prompts_file
from store.errors import UsageError
from store.schema import PLAIN_ROLE, TEMPLATE_ROLE

DEV_PROMPTS_FILE = Path(__file__).parent.parent / "data" / "dev_prompts.txt"


def collect_prompts(prompts_files: list[str] | None = None, inline: list[str] | None = None, *,
                    field: str | None = None, limit: int | None = None, shuffle: bool = False,
                    seed: int = 0) -> tuple[list[Prompt], list[int]]:
    """File prompts first (in file order), then inline prompts; the dev prompts when neither is given.

    ``shuffle`` (with ``seed``) and then ``limit`` sample them. Returns the prompts and
    each one's row in the unsampled list (file rows first, then inline prompts).
    """
    prompts: list[Prompt] = [p for f in prompts_files or [] for p in read_prompts_file(f, field)]
    for index, text in enumerate(inline or []):
        if not text.strip():
            raise EmptyPrompt(index=len(prompts) + index, where="(from --prompt) ")
    prompts += list(inline or [])
    if not prompts:
        prompts = read_prompts_file(DEV_PROMPTS_FILE)
    rows = list(range(len(prompts)))
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    if shuffle:
        random.Random(seed).shuffle(rows)
    rows = rows[:limit] if limit is not None else rows
    return [prompts[r] for r in rows], rows


@dataclass
class TokenizedPrompts:
    """Token ids and raw token pieces per prompt (ragged: each prompt keeps its length).

    ``roles`` (when a chat template rendered the prompts) gives each token the role of
    the message whose content it belongs to, or ``template`` for the template's own
    tokens (role markers, separators, the generation prompt).
    """

    texts: list[str]
    ids: list[list[int]]
    pieces: list[list[str]] = field(default_factory=list)
    roles: list[list[str]] | None = None
    labels: list[int] | None = None  # each prompt's position in source order (default: its index)
    templated: list[bool] | None = None  # whether the chat template rendered each prompt
    response_start: list[int] | None = None  # with --generate: each prompt's first response position
    stop_reason: list[str] | None = None  # with --generate: why its generation stopped

    @property
    def lengths(self) -> list[int]:
        return [len(i) for i in self.ids]

    def label(self, row: int) -> int:
        return self.labels[row] if self.labels is not None else row

    def take(self, rows: list[int]) -> TokenizedPrompts:
        """These prompts in this order."""
        pick = lambda items: [items[r] for r in rows] if items is not None else None  # noqa: E731
        labels = [self.labels[r] for r in rows] if self.labels is not None else list(rows)
        return TokenizedPrompts(pick(self.texts), pick(self.ids), pick(self.pieces) or [], pick(self.roles), labels,
                                pick(self.templated), pick(self.response_start), pick(self.stop_reason))


def _token_roles(offsets: list[tuple[int, int]], text: str, messages: list[dict]) -> list[str]:
    """The role of each token: the message whose content its characters overlap, else the template's."""
    spans, cursor = [], 0
    for turn in messages:
        start = text.find(turn["content"], cursor)
        if start < 0:  # the template rewrote the content: its tokens count as template
            continue
        spans.append((start, start + len(turn["content"]), turn["role"]))
        cursor = start + len(turn["content"])
    roles = []
    for begin, end in offsets:
        role = next((r for s, e, r in spans if begin < e and end > s), TEMPLATE_ROLE)
        roles.append(role)
    return roles


CHAT_TEMPLATE_MODES = ("auto", "always", "never")


def chat_template_mode(value) -> str:
    """``--chat-template`` as one of :data:`CHAT_TEMPLATE_MODES` (True/False from older configs: always/auto).

    >>> chat_template_mode(True), chat_template_mode(None), chat_template_mode("never")
    ('always', 'auto', 'never')
    """
    if value is None or value is False:
        return "auto"
    if value is True:
        return "always"
    if value not in CHAT_TEMPLATE_MODES:
        raise UsageError(f"--chat-template must be one of {', '.join(CHAT_TEMPLATE_MODES)}, got {value!r}")
    return str(value)


def templated_prompts(texts: list[Prompt], mode: str) -> list[bool]:
    """Which prompts the chat template renders: ``auto`` the conversations (``messages`` rows) only,
    ``always`` every prompt (a text becomes a user turn), ``never`` none (a conversation is refused).

    >>> templated_prompts(["a", [{"role": "user", "content": "b"}]], "auto")
    [False, True]
    """
    mode = chat_template_mode(mode)
    chats = [isinstance(t, list) for t in texts]
    if mode == "never" and any(chats):
        raise UsageError(f"--chat-template never, but prompt {chats.index(True)} is a chat conversation (a "
                         "messages list) that only the chat template can render; use --chat-template auto")
    return [True] * len(texts) if mode == "always" else chats


def tokenize_prompts(
    tokenizer,
    texts: list[Prompt],
    *,
    add_bos: bool = False,
    chat_template: str | bool = "auto",
    max_tokens: int | None = None,
    truncate: bool = False,
    limit_reason: str = "--max-tokens",
    generation_prompt: bool = False,
) -> TokenizedPrompts:
    """Tokenise prompts for capture; too-long prompts are an error unless ``truncate``.

    ``chat_template`` (:func:`templated_prompts`) says which prompts the tokenizer's chat
    template renders; plain texts are never wrapped unless it is ``always``. When any prompt
    is rendered, every token gets a role (:data:`PLAIN_ROLE` for the plain prompts' tokens)
    and ``templated`` records which prompts were. ``generation_prompt`` (``--generate``) ends every rendered
    conversation with the template's generation prompt, even one whose last turn is the assistant's.
    """
    templated = templated_prompts(texts, chat_template)
    chats = any(templated)
    if chats and not getattr(tokenizer, "chat_template", None):
        what = "--chat-template always was given" if not any(isinstance(t, list) for t in texts) else \
            "the prompts are chat conversations"
        raise UsageError(f"{what} but the tokenizer has no chat template; give a tokenizer with one (--tokenizer) "
                         "or plain-text prompts")
    if add_bos and tokenizer.bos_token_id is None:
        raise UsageError("--add-bos was given but the tokenizer has no BOS token; drop the flag")
    all_ids: list[list[int]] = []
    rendered: list[str] = []
    roles: list[list[str]] | None = [] if chats else None
    for index, (prompt, render) in enumerate(zip(texts, templated, strict=True)):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = prompt if not render else tokenizer.apply_chat_template(
            messages, tokenize=False,
            add_generation_prompt=generation_prompt or messages[-1]["role"] != "assistant")
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=render)
        ids = list(encoded["input_ids"])
        kinds = _token_roles(encoded["offset_mapping"], text, messages) if render else (
            [PLAIN_ROLE] * len(ids) if chats else None)
        if add_bos and (not ids or ids[0] != tokenizer.bos_token_id):
            ids.insert(0, tokenizer.bos_token_id)
            kinds = [TEMPLATE_ROLE, *kinds] if kinds is not None else None
        if not ids:
            raise EmptyPrompt(index=index, where="(it has no tokens) ")
        if max_tokens is not None and len(ids) > max_tokens:
            if not truncate:
                raise PromptTooLong(index=index, n=len(ids), limit=max_tokens, why=limit_reason)
            warnings.warn(f"prompt {index} truncated from {len(ids)} to {max_tokens} tokens", stacklevel=2)
            ids = ids[:max_tokens]
            kinds = kinds[:max_tokens] if kinds is not None else None
        all_ids.append(ids)
        rendered.append(text if isinstance(prompt, list) else prompt)
        if roles is not None:
            roles.append(kinds)
    pieces = [list(tokenizer.convert_ids_to_tokens(ids)) for ids in all_ids]
    return TokenizedPrompts(texts=rendered, ids=all_ids, pieces=pieces, roles=roles, templated=templated)


def describe_templating(templated: list[bool], mode: str) -> str | None:
    """One line on a mixed set (some prompts rendered with the chat template, some not); None otherwise."""
    n = sum(templated)
    if 0 < n < len(templated):
        return (f"chat template applied to the {n} chat conversations only; the other {len(templated) - n} prompts "
                f"are plain text, tokenised as they are (--chat-template {mode}; `always` wraps them as user turns)")
    return None


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
    roles = [r[:target] for r in tokenized.roles] if tokenized.roles is not None else None
    message = f"normalized prompt lengths to {target} tokens (previous max length {max(lengths)} tokens)"
    return TokenizedPrompts(texts=texts, ids=ids, pieces=pieces, roles=roles, templated=tokenized.templated), message
