"""The capture's errors: prompts, passes, models, the forward passes and the memory budget.

They derive from the one root, :class:`store.errors.ResdiffError` (so the CLI and callers catch them
alike), and each also inherits the builtin it resembles; each carries its message template (``_msg``)
as the store's errors do.

>>> str(UnknownPass(name="XY")).split(";")[0]
"unknown pass 'XY'"
>>> isinstance(ModelMissing(what="model", ref="m", reason="offline"), OSError)
True
"""

from __future__ import annotations

from store.errors import ResdiffError, UsageError


class UnknownPass(UsageError):
    _msg = ("unknown pass {name!r}; use BB, BS, SB, SS or define it as NAME=LLM:EMBEDDING[:UNEMBEDDING] with each "
            "of LLM, EMBEDDING, UNEMBEDDING being 'base' or 'sft'")


class DuplicatePass(UsageError):
    _msg = "pass {name!r} is listed twice in --passes; give each pass once"


class NoPrompts(UsageError):
    _msg = "no prompts to capture{where}; give --prompt TEXT or a --prompts-file"


class EmptyPrompt(UsageError):
    _msg = "prompt {index} {where}is empty; remove the empty line or give text"


class PromptTooLong(UsageError):
    _msg = ("prompt {index} has {n} tokens, more than the limit of {limit} ({why}); shorten it, raise --max-tokens, "
            "or pass --truncate to cut it with a warning")


class BadPromptRow(UsageError):
    """A row of a prompts dataset that cannot be read as a prompt."""

    _msg = "{path}: row {row}, field {field!r}: {problem}; fix the row or choose the field with --field"


class ModelPairNotFound(ResdiffError, KeyError):
    """A ``--pair`` name that is not in the registry of model pairs."""

    _msg = ("unknown model pair {name!r}{hint}; run `python cli.py pairs` to list them, or pass --base DIR_OR_ID "
            "--sft DIR_OR_ID")


class ModelLoadError(ResdiffError, OSError):
    """A model or tokenizer that cannot be loaded."""

    _msg = "cannot load {what} {ref!r}: {reason}"


class ModelMissing(ModelLoadError):
    _msg = ("cannot load {what} {ref!r}: it is not a local directory and could not be fetched from the model hub "
            "({reason}); download it where you have network and pass its local directory instead")


class PickleRefused(ModelLoadError):
    _msg = ("{ref!r} has only pickle weights ({files}), which can run code when loaded; convert them to "
            "safetensors, or pass --allow-pickle if you trust their source")


class IncompatibleModels(ResdiffError, ValueError):
    """Base and SFT models whose shapes do not allow swapping embeddings."""

    _msg = ("base and SFT models cannot be swapped: {detail}; resdiff needs two models of the same shape "
            "(the same vocabulary size, hidden size and layer count)")


class MismatchedArchitectures(IncompatibleModels):
    _msg = ("base model is a {base} ({base_ref}) but the SFT model is a {sft} ({sft_ref}); an SFT variant has its "
            "base's architecture, so this is probably the wrong pair. Pass --allow-mismatched-pair if you mean it")


class CaptureError(ResdiffError, RuntimeError):
    """A failure during the forward passes."""


class NonFiniteActivation(CaptureError):
    _msg = ("non-finite activation in pass {pass_}, prompt {prompt}, layer {layer}, position {token} ({value}); "
            "run with --dtype float32 or --store-dtype float32")


class CarriedStateDamaged(CaptureError):
    """A carried state (``--cross-layers``) whose bytes no longer match the checksum written with them."""

    _msg = ("the carried state of {which} in {folder} fails its checksum (the file was changed or damaged after "
            "it was written); nothing of it was used, and its prompts are marked to be recomputed: rerun the same "
            "command")


class MemoryBudgetExceeded(ResdiffError, MemoryError):
    """A capture whose predicted peak memory is over the ``--max-memory`` the user set."""

    _msg = ("capture would need about {peak} at its peak, more than --max-memory {limit} ({baseline} in use before "
            "loading, then {step}); lower --batch-size, --batch-tokens or --chunk-prompts, load the models in "
            "--dtype bfloat16, capture --no-lens, or raise --max-memory (see `capture --plan`)")
