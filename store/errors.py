"""The one exception hierarchy of resdiff.

Every error a user can cause derives from :class:`ResdiffError`, and each subclass also
inherits the builtin it resembles, so ``except FileNotFoundError`` keeps working for
callers who do not know resdiff. As in zarr-python, each class carries its own message
template (``_msg``), filled from keyword fields; a class raised with a single positional
text uses that text as is. Messages say what was wrong and what to do; the CLI prints
them on one line.

It lives in ``store`` because the store is the base every other package builds on
(capture writes through it, analysis reads through it).

>>> str(StoreNotFound(path="runs/a.zarr"))
'no resdiff store at runs/a.zarr; capture one with `python cli.py capture` or check the path'
>>> isinstance(StoreNotFound(path="x"), FileNotFoundError)
True
"""

from __future__ import annotations


class ResdiffError(Exception):
    """Base class of every error resdiff raises on purpose."""

    _msg = "{detail}"

    def __init__(self, *args: object, **fields: object) -> None:
        if args and not fields:
            message = str(args[0])
        else:
            message = self._msg.format(**fields)
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.message

    def __reduce__(self):  # pickles (to and from dask workers) as its finished message
        return type(self), (self.message,)


class UsageError(ResdiffError, ValueError):
    """A bad option, prompt, pass list or analysis request given by the user."""


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


class MissingData(ResdiffError, ValueError):
    """A store that lacks what an analysis needs (residuals, lens statistics, passes...)."""

    _msg = "this store has no {what}; {fix}"


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


class StoreNotFound(ResdiffError, FileNotFoundError):
    """A path that holds no resdiff store."""

    _msg = "no resdiff store at {path}; capture one with `python cli.py capture` or check the path"


class StoreFormatError(ResdiffError, ValueError):
    """A store that exists but cannot be read as a resdiff store (or not for this purpose)."""

    _msg = "{path} is not a readable resdiff store: {detail}"


class NotExportable(ResdiffError, ValueError):
    """A store the target format cannot hold."""

    _msg = "{path} cannot be exported in this format: {detail}"


class StoreConflict(ResdiffError, FileExistsError):
    """A store that exists with settings that differ from the requested ones."""

    _msg = ("store {path} already exists and was captured with other settings ({diff}); pass --overwrite to start "
            "over, or --store PATH to write elsewhere")


class StoreWriteError(ResdiffError, OSError):
    """The file system refused a write (full disk, quota, read-only or forbidden directory)."""

    _msg = ("cannot write the store at {path}: {reason}; free space or fix the permissions (or choose another "
            "--store), then rerun the same command: completed regions are kept and the rest resumes")


class CaptureError(ResdiffError, RuntimeError):
    """A failure during the forward passes."""


class NonFiniteActivation(CaptureError):
    _msg = ("non-finite activation in pass {pass_}, prompt {prompt}, layer {layer}, position {token} ({value}); "
            "run with --dtype float32 or --store-dtype float32")


class MemoryBudgetExceeded(ResdiffError, MemoryError):
    """A capture whose predicted peak memory is over the ``--max-memory`` the user set."""

    _msg = ("capture would need about {peak} at its peak, more than --max-memory {limit} ({baseline} in use before "
            "loading, then {step}); lower --batch-size, --batch-tokens or --chunk-prompts, load the models in "
            "--dtype bfloat16, capture --no-lens, or raise --max-memory (see `capture --plan`)")


class LensNotSaved(ResdiffError, KeyError):
    """The store was captured without ``--save-lens`` (and no checkpoint lens could be read)."""

    _msg = ("this store has no saved lens parameters, so lens statistics of new tokens cannot be computed; "
            "recapture with --save-lens (or use the tokens tracked at capture time, `tracked_logit`)")


class StoreLocked(ResdiffError, BlockingIOError):
    """Another process is writing the store (capture, resume, overwrite or import)."""

    _msg = ("store {path} is being written by {holder}; wait for that run to finish (or stop it), then rerun: a "
            "store takes one writer at a time")


class CorruptChunk(ResdiffError, ValueError):
    """A chunk whose bytes fail their checksum or cannot be decoded."""

    _msg = ("store {path}: chunk {key} of {array!r} is corrupt ({reason}); its values cannot be trusted. Run "
            "`python cli.py verify --deep STORE` to list every bad chunk, then recapture the store (or restore it)")


# What zarr and numcodecs say about bytes that do not decode (their own exception types vary by codec).
_DAMAGE_SIGNS = ("checksum do not match", "decompression error", "blosc decompression", "error during blosc",
                 "Zstd decompression", "LZ4 decompression")


def damaged_store_error(exc: BaseException) -> ResdiffError | None:
    """The one-line error for a chunk that zarr itself failed to decode (read through zarr rather than the
    direct reader, so its key is unknown here); None for any other exception."""
    text = str(exc)
    if not any(sign.lower() in text.lower() for sign in _DAMAGE_SIGNS):
        return None
    first = text.splitlines()[0][:160] if text else type(exc).__name__
    return ResdiffError(f"a chunk of the store failed to decode ({first}): the store is damaged and its values "
                        "cannot be trusted; run `python cli.py verify --deep STORE` to list every bad chunk, then "
                        "recapture the store (or restore it)")
