"""Responses a model generated for the prompts (``capture --generate N``): the settings, the journal, and the
prompts extended by them.

Generation comes before the store exists (the store's layout follows the prompt + response lengths), so
each generated batch is first written to a journal beside the store, ``<store>.responses/``, one JSON file
per batch. A killed run finds there the responses it already generated and generates only the rest; the
journal is removed once the store holding the responses is created. Responses are keyed by the prompt's
source position (its ``prompt`` label), never by batch, so a resumed run may batch differently.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from capture.inputs.prompts import TokenizedPrompts
from store.atomic import atomic_output, remove_path
from store.errors import StoreConflict, UsageError
from store.schema import PLAIN_ROLE, RESPONSE_ROLE

GENERATING_MODELS = ("sft", "base")
STOP_REASONS = {
    "eos": "the model wrote an end-of-turn or EOS token (the last response token)",
    "length": "--generate N tokens were written",
    "context": "the model's context length was reached",
}


@dataclass(frozen=True)
class Generation:
    """How responses are generated: ``new_tokens`` at most, by ``model``; greedy unless ``temperature``.

    Sampling draws each prompt's tokens from its own generator, seeded by ``seed`` and the prompt's source
    position, so a prompt's response does not depend on which prompts share its batch.
    """

    new_tokens: int
    model: str = "sft"
    temperature: float | None = None
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        return self.temperature is not None

    def record(self) -> dict:
        """What the store's attributes (and its content fingerprint) record of the generation."""
        return {"new_tokens": self.new_tokens, "model": self.model,
                "decoding": "sample" if self.sampling else "greedy", "temperature": self.temperature,
                "seed": self.seed if self.sampling else None}


def check_generation(new_tokens: int | None, model: str | None, temperature: float | None, seed: int | None,
                     positions: str | None, log) -> Generation | None:
    """The generation asked for, or None; every refusal comes here, before anything is loaded.

    >>> check_generation(8, None, None, None, None, print)
    Generation(new_tokens=8, model='sft', temperature=None, seed=None)
    >>> check_generation(None, None, None, None, None, print) is None
    True
    """
    if new_tokens is None:
        for flag, value in (("--generate-with", model), ("--temperature", temperature)):
            if value is not None:
                raise UsageError(f"{flag} only applies with --generate N; add --generate N or drop {flag}")
        return None
    if new_tokens < 1:
        raise UsageError(f"--generate {new_tokens}: the number of new tokens must be at least 1; drop --generate "
                         "to capture the prompts as given")
    if positions:
        raise UsageError("--generate stores every prompt and response token; --positions would cut responses "
                         "off; drop one of them (analysis can select positions later)")
    model = model or "sft"
    if model not in GENERATING_MODELS:
        raise UsageError(f"--generate-with must be sft or base, got {model!r}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature must be a positive number, got {temperature}; leave it out for greedy "
                         "decoding")
    if temperature is not None and seed is None:
        seed = 0
        log(f"sampling at temperature {temperature} with seed 0 (no --seed given; the seed is recorded in the "
            "store, and --seed S chooses another)")
    return Generation(new_tokens, model, temperature, seed)


@dataclass(frozen=True)
class Response:
    """One prompt's generated token ids and why generation stopped (a key of :data:`STOP_REASONS`)."""

    ids: list[int]
    stop: str


def pending(tokenized: TokenizedPrompts, new_tokens: int, context: int | None, pad_id: int) -> TokenizedPrompts:
    """The prompts with room for their longest response (``new_tokens``, within ``context``): what the
    memory plan and ``--plan`` count before anything is generated."""
    budgets = [budget(len(ids), new_tokens, context) for ids in tokenized.ids]
    return with_responses(tokenized, {tokenized.label(r): Response([pad_id] * n, "length")
                                      for r, n in enumerate(budgets)})


def budget(prompt_length: int, new_tokens: int, context: int | None) -> int:
    """New tokens a prompt of ``prompt_length`` may get.

    >>> budget(10, 64, 32), budget(10, 8, None)
    (22, 8)
    """
    return max(0, min(new_tokens, context - prompt_length)) if context else new_tokens


def with_responses(tokenized: TokenizedPrompts, responses: dict[int, Response], tokenizer=None) -> TokenizedPrompts:
    """The prompts followed by their responses (``responses`` by prompt label), each response token with the
    role :data:`RESPONSE_ROLE` and its piece from ``tokenizer`` (empty pieces without one)."""
    found = [responses[tokenized.label(r)] for r in range(len(tokenized.ids))]
    pieces = [list(tokenizer.convert_ids_to_tokens(f.ids)) if tokenizer is not None else [""] * len(f.ids)
              for f in found]
    roles = tokenized.roles or [[PLAIN_ROLE] * len(ids) for ids in tokenized.ids]
    return replace(
        tokenized,
        ids=[ids + f.ids for ids, f in zip(tokenized.ids, found, strict=True)],
        pieces=[p + q for p, q in zip(tokenized.pieces, pieces, strict=True)],
        roles=[r + [RESPONSE_ROLE] * len(f.ids) for r, f in zip(roles, found, strict=True)],
        response_start=[len(ids) for ids in tokenized.ids],
        stop_reason=[f.stop for f in found],
    )


class Journal:
    """The responses generated so far for a store at ``path`` (its sibling folder ``<name>.responses``).

    ``fingerprint`` is the capture's content fingerprint: responses generated under other settings are
    refused, never mixed in.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: dict) -> None:
        store = Path(path)
        self.folder = store.with_name(store.name + ".responses")
        self.fingerprint = fingerprint

    def load(self) -> dict[int, Response]:
        """The responses stored, by prompt label (none when there is no journal)."""
        meta = self.folder / "settings.json"
        if not meta.exists():
            return {}
        if json.loads(meta.read_text()) != self.fingerprint:
            raise StoreConflict(path=self.folder, diff="its responses were generated for other prompts or settings")
        found: dict[int, Response] = {}
        for part in sorted(self.folder.glob("batch-*.json")):
            batch = json.loads(part.read_text())
            for label, ids, stop in zip(batch["labels"], batch["ids"], batch["stop"], strict=True):
                found[int(label)] = Response([int(i) for i in ids], str(stop))
        return found

    def add(self, responses: dict[int, Response]) -> None:
        """Record one batch's responses, whole or not at all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "settings.json"
        if not meta.exists():
            with atomic_output(meta) as tmp:
                tmp.write_text(json.dumps(self.fingerprint, sort_keys=True))
        labels = sorted(responses)
        with atomic_output(self.folder / f"batch-{labels[0]:08d}.json") as tmp:
            tmp.write_text(json.dumps({"labels": labels, "ids": [responses[k].ids for k in labels],
                                       "stop": [responses[k].stop for k in labels]}))

    def discard(self) -> None:
        remove_path(self.folder)
