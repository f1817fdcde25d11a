"""Capturing only what is asked: ``--layers`` and ``--positions``.

``--layers 0,8,16:24`` keeps those layers (``a:b`` is a..b-1 as in Python, ``a:`` runs to
the last layer, negative numbers count from the end); the ``layer`` coordinate keeps
their true numbers. ``--positions first:32`` keeps each prompt's first 32 tokens (the
forward then runs on those alone: later tokens cannot change them), ``last:16`` its
last 16 (the forward runs on the whole prompt); the ``token_position`` coordinate
records each stored token's position in its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from store.errors import UsageError


def parse_layers(spec: str | None, n_layers1: int, flag: str = "--layers") -> list[int]:
    """The layer numbers ``spec`` names, sorted and unique (all of 0..L when None).

    >>> parse_layers("0,8,16:20,-1", 25)
    [0, 8, 16, 17, 18, 19, 24]
    """
    if spec is None:
        return list(range(n_layers1))

    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{flag} {spec!r}: {text!r} is not a layer number; write e.g. 0,8,16:24") from None
        value = value + n_layers1 if value < 0 else value
        if not 0 <= value < n_layers1:
            raise UsageError(f"{flag} {spec!r}: layer {text} is outside 0..{n_layers1 - 1} (the model has "
                             f"{n_layers1 - 1} blocks; layer 0 is the embedding output)")
        return value

    layers: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        if ":" in item:
            start, _, stop = item.partition(":")
            first = number(start) if start else 0
            last = number(stop) if stop and int(stop) not in (n_layers1,) else n_layers1
            layers.update(range(first, last))
        else:
            layers.add(number(item))
    if not layers:
        raise UsageError(f"{flag} {spec!r} names no layer; write e.g. 0,8,16:24")
    return sorted(layers)


@dataclass(frozen=True)
class Positions:
    """Which token positions of each prompt are stored: all, the first ``count`` or the last ``count``."""

    kind: str = "all"
    count: int | None = None

    @classmethod
    def parse(cls, spec: str | None) -> Positions:
        """``first:32``, ``last:16`` or ``all``.

        >>> Positions.parse("last:16").window(40), Positions.parse("first:32").window(10)
        ((24, 40), (0, 10))
        """
        if spec is None or spec.strip() == "all":
            return cls()
        kind, _, count = spec.strip().partition(":")
        if kind not in ("first", "last") or not count.isdigit() or int(count) < 1:
            raise UsageError(f"--positions {spec!r} must be first:N, last:N or all, with N >= 1")
        return cls(kind, int(count))

    def window(self, n_tokens: int) -> tuple[int, int]:
        """(start, stop) of the stored positions of a prompt of ``n_tokens``."""
        if self.kind == "first":
            return 0, min(n_tokens, self.count)
        if self.kind == "last":
            return max(0, n_tokens - self.count), n_tokens
        return 0, n_tokens

    def describe(self) -> str:
        return "all" if self.kind == "all" else f"{self.kind}:{self.count}"


@dataclass(frozen=True)
class StoredWindow:
    """What of each prompt is stored: positions ``start[i]:stop[i]`` of the ids the forward sees, and the
    recorded layers (true numbers)."""

    start: list[int]
    stop: list[int]
    layers: list[int]

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.start, self.stop, strict=True)]
