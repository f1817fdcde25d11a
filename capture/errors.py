"""The one exception hierarchy of resdiff.

Every error a user can cause derives from :class:`ResdiffError`, and each subclass
also inherits the builtin it resembles, so ``except FileNotFoundError`` keeps working
for callers who do not know resdiff. Messages say what was wrong and what to do; the
CLI prints them on one line. Templates live in :data:`MESSAGES` so wording stays
consistent wherever an error is raised.

The hierarchy sits in ``capture`` because capture is the top of the data flow
(capture -> store -> analysis -> cli): every later package may import it.
"""

from __future__ import annotations

MESSAGES: dict[str, str] = {
    "unknown_pair": "unknown model pair {name!r}{hint}; run `python cli.py pairs` to list them, "
    "or pass --base DIR_OR_ID --sft DIR_OR_ID",
    "model_missing": "cannot load {what} {ref!r}: it is not a local directory and could not be fetched "
    "from the model hub ({reason}); download it where you have network and pass its local directory instead",
    "model_load": "cannot load {what} {ref!r}: {reason}",
    "pickle_refused": "{ref!r} has only pickle weights ({files}), which can run code when loaded; convert them "
    "to safetensors, or pass --allow-pickle if you trust their source",
    "incompatible": "base and SFT models cannot be swapped: {detail}; resdiff needs two models of the "
    "same shape (the same vocabulary size, hidden size and layer count)",
    "unknown_pass": "unknown pass {name!r}; use BB, BS, SB, SS or define it as NAME=LLM:EMBEDDING[:UNEMBEDDING] "
    "with each of LLM, EMBEDDING, UNEMBEDDING being 'base' or 'sft'",
    "duplicate_pass": "pass {name!r} is listed twice in --passes; give each pass once",
    "no_prompts": "no prompts to capture{where}; give --prompt TEXT or a --prompts-file with one prompt per line",
    "empty_prompt": "prompt {index} {where}is empty; remove the empty line or give text",
    "prompt_too_long": "prompt {index} has {n} tokens, more than the limit of {limit} ({why}); "
    "shorten it, raise --max-tokens, or pass --truncate to cut it with a warning",
    "store_exists": "store {path} already exists and was captured with other settings ({diff}); "
    "pass --overwrite to start over, or --store PATH to write elsewhere",
    "store_not_found": "no resdiff store at {path}; capture one with `python cli.py capture` "
    "or check the path",
    "store_format": "{path} is not a readable resdiff store: {detail}",
    "non_finite": "non-finite activation in pass {pass_}, prompt {prompt}, layer {layer}, position {token} "
    "({value}); run with --dtype float32 or --store-dtype float32",
    "bad_option": "{detail}",
    "over_memory": "capture would need about {peak} at its peak, more than --max-memory {limit} ({baseline} "
    "in use before loading, then {step}); lower --batch-size or --chunk-prompts, load the models in "
    "--dtype bfloat16, capture --no-lens, or raise --max-memory (see `capture --plan`)",
    "store_write": "cannot write the store at {path}: {reason}; free space or fix the permissions (or choose "
    "another --store), then rerun the same command: completed regions are kept and the rest resumes",
}


class ResdiffError(Exception):
    """Base class of every error resdiff raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message

    @classmethod
    def from_template(cls, key: str, **fields: object) -> ResdiffError:
        return cls(MESSAGES[key].format(**fields))


class UsageError(ResdiffError, ValueError):
    """A bad option, prompt or pass list given by the user."""


class PairNotFound(ResdiffError, KeyError):
    """A ``--pair`` name that is not in the registry."""


class ModelLoadError(ResdiffError, OSError):
    """A model or tokenizer that cannot be loaded."""


class IncompatibleModels(ResdiffError, ValueError):
    """Base and SFT models whose shapes do not allow swapping embeddings."""


class StoreNotFound(ResdiffError, FileNotFoundError):
    """A path that holds no resdiff store."""


class StoreFormatError(ResdiffError, ValueError):
    """A store that exists but cannot be read as a resdiff store."""


class StoreConflict(ResdiffError, FileExistsError):
    """A store that exists with settings that differ from the requested ones."""


class StoreWriteError(ResdiffError, OSError):
    """The file system refused a write (full disk, quota, read-only or forbidden directory)."""


class CaptureError(ResdiffError, RuntimeError):
    """A failure during the forward passes, such as non-finite activations."""


class MemoryBudgetExceeded(ResdiffError, MemoryError):
    """A capture whose predicted peak memory is over the ``--max-memory`` the user set."""
