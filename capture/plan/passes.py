"""The pass plan: which LLM runs on which input embeddings, read out by which unembedding.

A pass is named embedding source first, then LLM: ``SB`` feeds the SFT model's input
embeddings through the base LLM. The unembedding (used by the logit lens) defaults to
the active LLM's. A crossed pass (``--cross-layers``) changes bodies at a split layer ``L``:
``B>S@L`` runs the base model's embedding and blocks 0..L-1, then the SFT model's blocks L.. with
its final norm and unembedding; ``S>B@L`` is the mirror. Its ``llm`` is the upper body (the model
resident when its blocks run), ``lower`` the body below the split.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

from capture.errors import DuplicatePass, UnknownPass
from store.errors import UsageError
from store.schema import STANDARD_PASSES, default_pass_pairs

SOURCES = ("base", "sft")


@dataclass(frozen=True)
class Pass:
    """One forward pass: ``llm`` runs on ``embedding``'s input embeddings; a crossed pass runs ``lower``'s
    blocks below ``split`` first."""

    name: str
    llm: str
    embedding: str
    unembedding: str
    split: int | None = None  # a crossed pass's split layer: blocks 0..split-1 are ``lower``'s
    lower: str | None = None

    @property
    def crossed(self) -> bool:
        return self.split is not None

    @property
    def lower_body(self) -> str:
        return self.lower if self.crossed else self.llm

    def to_dict(self) -> dict:
        # an uncrossed pass keeps the four keys every earlier store recorded (its content fingerprint)
        return asdict(self) if self.crossed else {k: v for k, v in asdict(self).items() if k not in ("split", "lower")}


def crossed_passes(splits: list[int]) -> tuple[Pass, ...]:
    """``B>S@L`` and ``S>B@L`` for each split ``L``.

    >>> [p.name for p in crossed_passes([2])]
    ['B>S@2', 'S>B@2']
    """
    return tuple(Pass(f"{a[0].upper()}>{b[0].upper()}@{split}", b, a, b, split, a)
                 for split in splits for a, b in (("base", "sft"), ("sft", "base")))


def parse_cross_layers(spec: str | None, n_layers: int) -> list[int]:
    """``--cross-layers``: split layers as ``4,8,12`` or ``a:b:step`` (``b`` excluded), each in 0..``n_layers``
    (the number of blocks), increasing, without repeats.

    >>> parse_cross_layers("0:24:4", 24), parse_cross_layers("3,7", 8)
    ([0, 4, 8, 12, 16, 20], [3, 7])
    """
    if spec is None:
        return []
    text = str(spec).strip()
    try:
        if ":" in text:
            parts = [int(x) for x in text.split(":")]
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            splits = list(range(*parts))
        else:
            splits = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--cross-layers {spec!r}: give split layers as 4,8,12 or START:STOP:STEP") from None
    if not splits:
        raise UsageError(f"--cross-layers {spec!r} names no split layer; e.g. 4,8,12 or 0:{n_layers}:4")
    bad = [s for s in splits if not 0 <= s <= n_layers]
    if bad:
        raise UsageError(f"--cross-layers {spec!r}: split {bad[0]} is out of range; the models have {n_layers} "
                         f"blocks, so a split is 0..{n_layers} (blocks below it from one model, the rest from the "
                         "other)")
    if any(b <= a for a, b in itertools.pairwise(splits)):
        raise UsageError(f"--cross-layers {spec!r}: give each split once, in increasing order")
    return splits


DEFAULT_PASSES: tuple[Pass, ...] = tuple(Pass(**spec) for spec in STANDARD_PASSES)
_DEFAULT_BY_NAME = {p.name: p for p in DEFAULT_PASSES}


def _parse_one(text: str) -> Pass:
    text = text.strip()
    if "=" not in text:
        if text.upper() in _DEFAULT_BY_NAME:
            return _DEFAULT_BY_NAME[text.upper()]
        raise UnknownPass(name=text)
    name, _, spec = text.partition("=")
    parts = [p.strip().lower() for p in spec.split(":")]
    if not name.strip() or len(parts) not in (2, 3) or any(p not in SOURCES for p in parts):
        raise UnknownPass(name=text)
    llm, embedding = parts[0], parts[1]
    unembedding = parts[2] if len(parts) == 3 else llm
    return Pass(name.strip(), llm, embedding, unembedding)


def parse_passes(spec: str | list[str] | None) -> tuple[Pass, ...]:
    """Parse ``--passes``: comma-separated default names or ``NAME=LLM:EMB[:UNEMB]``.

    >>> [p.name for p in parse_passes("BB,ss")]
    ['BB', 'SS']
    >>> parse_passes("BSb=sft:base:base")[0].unembedding
    'base'
    """
    if spec is None:
        return DEFAULT_PASSES
    items = spec.split(",") if isinstance(spec, str) else [s for chunk in spec for s in chunk.split(",")]
    passes = tuple(_parse_one(item) for item in items if item.strip())
    if not passes:
        raise UsageError("--passes is empty; give at least one pass, e.g. BB,SS")
    seen: set[str] = set()
    for p in passes:
        if p.name in seen:
            raise DuplicatePass(name=p.name)
        seen.add(p.name)
    return passes


def source_pass(passes: tuple[Pass, ...], crossed: Pass) -> int:
    """The uncrossed pass whose state at ``crossed.split`` a crossed pass continues (``BB`` for ``B>S@L``)."""
    for index, p in enumerate(passes):
        if not p.crossed and p.llm == crossed.lower and p.embedding == crossed.embedding:
            return index
    raise UsageError(f"pass {crossed.name} continues the {crossed.embedding}-embedding {crossed.lower} pass from "
                     f"layer {crossed.split}, which --passes leaves out; keep "
                     f"{crossed.embedding[0].upper()}{crossed.lower[0].upper()} in --passes")


def schedule(passes: tuple[Pass, ...]) -> list[tuple[str, list[int]]]:
    """Group pass indices by LLM so that each model is loaded once: base first, then SFT; crossed passes
    whose lower part comes from a later step (``S>B@L`` after the SFT model's ``SS``) get a last step of
    their own (the base model loaded again)."""
    plain = [(llm, [i for i, p in enumerate(passes) if p.llm == llm and not p.crossed]) for llm in SOURCES]
    steps = [(llm, [*idx, *(i for i, p in enumerate(passes) if p.crossed and p.llm == llm and p.lower == "base")])
             for llm, idx in plain]
    after = [i for i, p in enumerate(passes) if p.crossed and p.lower == "sft" and p.llm == "base"]
    if after:
        steps.append(("base", after))
    return [(llm, idx) for llm, idx in steps if idx]


@dataclass(frozen=True)
class PassPair:
    """A comparison of two passes: statistics are right relative to left (shift = right - left)."""

    name: str
    left: int
    right: int


def parse_pass_pairs(spec: str | list[str] | None, passes: tuple[Pass, ...], allow_crossed: bool = False
                     ) -> tuple[PassPair, ...]:
    """Parse ``--pass-pair``: ``LEFT-RIGHT`` (or ``LEFT:RIGHT``, ``NAME=LEFT-RIGHT``), comma-separated.

    The default is every pair of passes in plan order: for BB, BS, SB, SS the six
    BB-BS, BB-SB, BB-SS, BS-SB, BS-SS, SB-SS; with crossed passes, also each against SS or BB
    (:func:`store.schema.default_pass_pairs`). ``allow_crossed`` lets names of crossed passes through unchecked (the
    early check, before the number of layers is known).

    >>> [p.name for p in parse_pass_pairs(None, DEFAULT_PASSES)][:3]
    ['BB-BS', 'BB-SB', 'BB-SS']
    >>> [p.name for p in parse_pass_pairs(None, DEFAULT_PASSES + crossed_passes([2]))][6:]
    ['B>S@2-SS', 'S>B@2-BB', 'BB-B>S@2', 'BB-S>B@2']
    """
    index = {p.name.upper(): i for i, p in enumerate(passes)}
    if spec is None:
        return tuple(PassPair(name, index[left.upper()], index[right.upper()])
                     for name, left, right in default_pass_pairs([p.to_dict() for p in passes]))
    items = spec.split(",") if isinstance(spec, str) else [s for chunk in spec for s in chunk.split(",")]
    pairs: list[PassPair] = []
    for item in (i.strip() for i in items if i.strip()):
        name, _, body = item.rpartition("=")
        parts = body.replace(":", "-").split("-")
        if allow_crossed and len(parts) == 2 and any("@" in part for part in parts):
            continue  # checked again once the crossed passes exist
        if len(parts) != 2 or any(part.strip().upper() not in index for part in parts):
            known = ", ".join(p.name for p in passes)
            raise UsageError(f"pair {item!r} does not name two passes of the plan ({known}); write it as LEFT-RIGHT, "
                             "e.g. BB-SS")
        left, right = (index[part.strip().upper()] for part in parts)
        pair = PassPair(name.strip() or f"{passes[left].name}-{passes[right].name}", left, right)
        if any(p.name == pair.name for p in pairs):
            raise UsageError(f"pair {pair.name!r} is listed twice in --pass-pair; give each pair once")
        pairs.append(pair)
    return tuple(pairs)
