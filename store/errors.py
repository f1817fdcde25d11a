"""The one exception hierarchy of resdiff.

Every error a user can cause derives from :class:`ResdiffError`, and each subclass also
inherits the builtin it resembles, so ``except FileNotFoundError`` keeps working for
callers who do not know resdiff. As in zarr-python, each class carries its own message
template (``_msg``), filled from keyword fields; a class raised with a single positional
text uses that text as is. Messages say what was wrong and what to do; the CLI prints
them on one line.

The root class, the usage and missing-data errors every package raises, and the store's own errors
live here, in ``store``, the base every other package builds on; the capture's errors (prompts,
passes, models, the forward passes, the memory budget) live in :mod:`capture.errors`, under the
same root.

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


class MissingData(ResdiffError, ValueError):
    """A store that lacks what an analysis needs (residuals, lens statistics, passes...)."""

    _msg = "this store has no {what}; {fix}"


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
