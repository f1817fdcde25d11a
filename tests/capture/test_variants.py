"""Each prompt variant against the behaviour described for the legacy registry."""

from __future__ import annotations

import random

import pytest

from capture.inputs.variants import VARIANTS, expand_prompts, register, split_sentences
from store.errors import UsageError

TEXT = "First one. Second?\nThird!  Fourth"


def run(name, text=TEXT, **options):
    return VARIANTS[name](text, options)


def test_all_eight_variants_are_registered():
    assert set(VARIANTS) == {"identity", "mirror_halves", "reverse_sentences", "shuffle_sentences",
                             "symmetric_concat", "base_prefixed", "sft_prefixed", "dual_channel"}


def test_identity():
    assert run("identity") == TEXT


def test_mirror_halves_splits_at_the_character_midpoint():
    assert run("mirror_halves", "abcde") == "cdeab"
    assert run("mirror_halves", "abcd") == "cdab"


def test_sentence_splitting():
    assert split_sentences(TEXT) == ["First one.", "Second?", "Third!", "Fourth"]
    assert split_sentences("  \n. ") == ["."]


def test_reverse_sentences():
    assert run("reverse_sentences") == "Fourth Third! Second? First one."


def test_shuffle_sentences_is_seeded():
    expected = ["First one.", "Second?", "Third!", "Fourth"]
    random.Random(0).shuffle(expected)
    assert run("shuffle_sentences") == " ".join(expected)
    other = ["First one.", "Second?", "Third!", "Fourth"]
    random.Random(5).shuffle(other)
    assert run("shuffle_sentences", seed=5) == " ".join(other)


def test_symmetric_concat():
    assert run("symmetric_concat", "abc") == "abc\n---\ncba"
    assert run("symmetric_concat", "abc", separator="|") == "abc|cba"


def test_prefixed():
    assert run("base_prefixed", "x") == "[BASE] x" and run("base_prefixed", "x", prefix="B:") == "B:x"
    assert run("sft_prefixed", "x") == "[SFT] x" and run("sft_prefixed", "x", prefix="S:") == "S:x"


def test_dual_channel_order():
    assert run("dual_channel", "p") == "BASE INPUT:\np\n\nSFT INPUT:\np"
    assert run("dual_channel", "p", order="sft_first", base_prefix="b:", sft_prefix="s:") == "s:p\n\nb:p"
    assert run("dual_channel", "p", order="anything else") == "BASE INPUT:\np\n\nSFT INPUT:\np"


def test_expand_orders_prompts_then_variants_and_records_sources():
    texts, sources, variants = expand_prompts(["a.", "b."], ["base_prefixed", "identity"],
                                              {"base_prefixed": {"prefix": "> "}})
    assert texts == ["> a.", "a.", "> b.", "b."]
    assert sources == [0, 0, 1, 1] and variants == ["base_prefixed", "identity", "base_prefixed", "identity"]
    with pytest.raises(UsageError, match="unknown prompt variant 'mirror'; known variants: identity"):
        expand_prompts(["a"], ["mirror"])
    with pytest.raises(ValueError, match="already registered"):
        register("identity")(lambda p, o: p)
