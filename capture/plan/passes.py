"""The pass plan: which LLM runs on which input embeddings, read out by which unembedding.

A pass is named embedding source first, then LLM: ``SB`` feeds the SFT model's input
embeddings through the base LLM. The unembedding (used by the logit lens) defaults to
the active LLM's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capture.errors import DuplicatePass, UnknownPass
from store.errors import UsageError
from store.schema import STANDARD_PASSES, every_pass_pair

SOURCES = ("base", "sft")


@dataclass(frozen=True)
class Pass:
    """One forward pass: ``llm`` runs on ``embedding``'s input embeddings."""

    name: str
    llm: str
    embedding: str
    unembedding: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


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


def schedule(passes: tuple[Pass, ...]) -> list[tuple[str, list[int]]]:
    """Group pass indices by LLM so that each model is loaded once: base first, then SFT."""
    return [(llm, [i for i, p in enumerate(passes) if p.llm == llm]) for llm in SOURCES
            if any(p.llm == llm for p in passes)]


@dataclass(frozen=True)
class PassPair:
    """A comparison of two passes: statistics are right relative to left (shift = right - left)."""

    name: str
    left: int
    right: int


def parse_pass_pairs(spec: str | list[str] | None, passes: tuple[Pass, ...]) -> tuple[PassPair, ...]:
    """Parse ``--pass-pair``: ``LEFT-RIGHT`` (or ``LEFT:RIGHT``, ``NAME=LEFT-RIGHT``), comma-separated.

    The default is every pair of passes in plan order: for BB, BS, SB, SS the six
    BB-BS, BB-SB, BB-SS, BS-SB, BS-SS, SB-SS.

    >>> [p.name for p in parse_pass_pairs(None, DEFAULT_PASSES)][:3]
    ['BB-BS', 'BB-SB', 'BB-SS']
    """
    index = {p.name.upper(): i for i, p in enumerate(passes)}
    if spec is None:
        return tuple(PassPair(name, index[left.upper()], index[right.upper()])
                     for name, left, right in every_pass_pair([p.name for p in passes]))
    items = spec.split(",") if isinstance(spec, str) else [s for chunk in spec for s in chunk.split(",")]
    pairs: list[PassPair] = []
    for item in (i.strip() for i in items if i.strip()):
        name, _, body = item.rpartition("=")
        parts = body.replace(":", "-").split("-")
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
