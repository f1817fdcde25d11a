"""Prompt variants: named rewrites applied to every prompt before tokenisation.

The registry and the eight variants follow the legacy tool (section 6 of the legacy
format notes), so configs that name them keep working. The same text goes to both
models. Each stored prompt records its source index and variant name.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from store.errors import UsageError

VariantFn = Callable[[str, dict], str]
VARIANTS: dict[str, VariantFn] = {}
SENTENCE_ENDS = ".?!\n"


def register(name: str) -> Callable[[VariantFn], VariantFn]:
    """Decorator adding a variant to :data:`VARIANTS`; a name can be registered once."""

    def add(fn: VariantFn) -> VariantFn:
        if name in VARIANTS:
            raise ValueError(f"prompt variant {name!r} is already registered")
        VARIANTS[name] = fn
        return fn

    return add


def split_sentences(text: str) -> list[str]:
    """Sentences end after '.', '?', '!' or a newline; pieces are stripped, empty ones dropped.

    >>> split_sentences("One. Two?\\nThree")
    ['One.', 'Two?', 'Three']
    """
    pieces, current = [], []
    for char in text:
        current.append(char)
        if char in SENTENCE_ENDS:
            pieces.append("".join(current))
            current = []
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


@register("identity")
def identity(prompt: str, options: dict) -> str:
    return prompt


@register("mirror_halves")
def mirror_halves(prompt: str, options: dict) -> str:
    middle = len(prompt) // 2
    return prompt[middle:] + prompt[:middle]


@register("reverse_sentences")
def reverse_sentences(prompt: str, options: dict) -> str:
    return " ".join(reversed(split_sentences(prompt)))


@register("shuffle_sentences")
def shuffle_sentences(prompt: str, options: dict) -> str:
    sentences = split_sentences(prompt)
    random.Random(options.get("seed", 0)).shuffle(sentences)
    return " ".join(sentences)


@register("symmetric_concat")
def symmetric_concat(prompt: str, options: dict) -> str:
    return prompt + options.get("separator", "\n---\n") + prompt[::-1]


@register("base_prefixed")
def base_prefixed(prompt: str, options: dict) -> str:
    return options.get("prefix", "[BASE] ") + prompt


@register("sft_prefixed")
def sft_prefixed(prompt: str, options: dict) -> str:
    return options.get("prefix", "[SFT] ") + prompt


@register("dual_channel")
def dual_channel(prompt: str, options: dict) -> str:
    base = options.get("base_prefix", "BASE INPUT:\n") + prompt
    sft = options.get("sft_prefix", "SFT INPUT:\n") + prompt
    return "\n\n".join([sft, base] if options.get("order") == "sft_first" else [base, sft])


def expand_prompts(
    prompts: list[str], names: list[str] | None = None, options: dict[str, dict] | None = None
) -> tuple[list[str], list[int], list[str]]:
    """Apply every variant to every prompt: prompts in order, variants in the given order.

    Returns (texts, source prompt index of each text, variant name of each text).

    >>> expand_prompts(["a b. c."], ["identity", "reverse_sentences"])
    (['a b. c.', 'c. a b.'], [0, 0], ['identity', 'reverse_sentences'])
    """
    names = list(names or ["identity"])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown prompt variant {unknown[0]!r}; known variants: {', '.join(VARIANTS)}")
    if len(set(names)) != len(names):
        raise UsageError("a prompt variant is listed twice; give each variant once")
    texts, sources, variants = [], [], []
    for index, prompt in enumerate(prompts):
        for name in names:
            if isinstance(prompt, list):  # a chat conversation: variants rewrite texts only
                if name != "identity":
                    raise UsageError(f"prompt variant {name!r} rewrites texts; prompt {index} is a chat "
                                     "conversation, which only the identity variant keeps")
                texts.append(prompt)
                sources.append(index)
                variants.append(name)
                continue
            texts.append(VARIANTS[name](prompt, dict((options or {}).get(name) or {})))
            sources.append(index)
            variants.append(name)
    return texts, sources, variants
