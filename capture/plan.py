"""The pass plan: which LLM runs on which input embeddings, read out by which unembedding.

A pass is named embedding source first, then LLM: ``SB`` feeds the SFT model's input
embeddings through the base LLM. The unembedding (used by the logit lens) defaults to
the active LLM's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from capture.errors import UsageError

SOURCES = ("base", "sft")
_LETTER = {"B": "base", "S": "sft"}


@dataclass(frozen=True)
class Pass:
    """One forward pass: ``llm`` runs on ``embedding``'s input embeddings."""

    name: str
    llm: str
    embedding: str
    unembedding: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


DEFAULT_PASSES: tuple[Pass, ...] = tuple(
    Pass(e + m, _LETTER[m], _LETTER[e], _LETTER[m]) for e, m in ("BB", "BS", "SB", "SS")
)
_DEFAULT_BY_NAME = {p.name: p for p in DEFAULT_PASSES}


def _parse_one(text: str) -> Pass:
    text = text.strip()
    if "=" not in text:
        if text.upper() in _DEFAULT_BY_NAME:
            return _DEFAULT_BY_NAME[text.upper()]
        raise UsageError.from_template("unknown_pass", name=text)
    name, _, spec = text.partition("=")
    parts = [p.strip().lower() for p in spec.split(":")]
    if not name.strip() or len(parts) not in (2, 3) or any(p not in SOURCES for p in parts):
        raise UsageError.from_template("unknown_pass", name=text)
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
        raise UsageError.from_template("bad_option", detail="--passes is empty; give at least one pass, e.g. BB,SS")
    seen: set[str] = set()
    for p in passes:
        if p.name in seen:
            raise UsageError.from_template("duplicate_pass", name=p.name)
        seen.add(p.name)
    return passes


def schedule(passes: tuple[Pass, ...]) -> list[tuple[str, list[int]]]:
    """Group pass indices by LLM so that each model is loaded once: base first, then SFT."""
    return [(llm, [i for i, p in enumerate(passes) if p.llm == llm]) for llm in SOURCES
            if any(p.llm == llm for p in passes)]
