"""The one rule for a location a command writes to: what is there, what the mode allows, what happens.

Every command that writes a store (``capture``, ``sweep``, ``import-json``, ``decompose``) names its
output and a mode, as zarr's ``StorePath`` does, and :func:`claim` says what to do:

========== ============= ===================================================================
mode       nothing there something there
========== ============= ===================================================================
create     ``"new"``     refused (:class:`~store.errors.StoreConflict`: overwrite it or choose
                         another path)
resume     ``"new"``     ``"existing"``: the caller checks it is the same work and goes on (a
                         template a killed run never finished counts as nothing there; a folder
                         or file that is not a Zarr store is refused)
overwrite  ``"new"``     ``"replace"``: the caller writes the new one and puts it in the old one's
                         place (or removes the old one first, :func:`store.writer.remove_store`);
                         refused unless it is a store resdiff wrote (``resdiff=False``: any Zarr
                         store), so a typo never deletes a user's file or folder
========== ============= ===================================================================

Claiming removes nothing, so a command that fails before it writes loses nothing. A caller that
holds the store's lock (:func:`store.lock.store_lock`) claims under it, so two writers never both
see ``"new"``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from store.errors import StoreConflict, UsageError
from store.location import StorePath, exists, is_url, normalize


class WriteMode(StrEnum):
    """How a command treats a location that already holds something."""

    CREATE = "create"
    RESUME = "resume"
    OVERWRITE = "overwrite"

    @classmethod
    def of(cls, mode: str | WriteMode) -> WriteMode:
        try:
            return cls(mode)
        except ValueError:
            raise UsageError(f"unknown write mode {mode!r}; use one of {', '.join(m.value for m in cls)}") from None


def claim(path: StorePath, mode: str | WriteMode, *, resdiff: bool = True,
          flag: str = "--store") -> Literal["new", "existing", "replace"]:
    """What writing ``path`` in ``mode`` means: ``"new"`` (nothing usable is there), ``"existing"``
    (``resume`` found it: the caller checks it and goes on) or ``"replace"`` (``overwrite`` found a
    store it may replace); refuses what the mode forbids.

    ``resdiff`` guards ``overwrite``: only a store resdiff wrote may be replaced (``False``: any Zarr
    store, for derived outputs such as a decomposition). ``flag`` names the option that chooses
    another path, for the refusal's message.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> path = write_tiny_store(tempfile.mkdtemp() + "/s.zarr")
    >>> claim(path, "resume"), claim(path, "overwrite"), claim(path.with_name("t.zarr"), "create")
    ('existing', 'replace', 'new')
    >>> claim(path, "create")
    Traceback (most recent call last):
    ...
    store.errors.StoreConflict: store ... already exists; pass --overwrite to replace it, or --store PATH
    """
    from store.reader import is_unfinished
    from store.writer import check_replaceable, check_resdiff_store

    mode, path = WriteMode.of(mode), normalize(path)
    if not exists(path):
        return "new"
    if mode is WriteMode.CREATE:
        raise StoreConflict(f"store {path} already exists; pass --overwrite to replace it, or {flag} PATH")
    if mode is WriteMode.OVERWRITE:
        if not is_url(path):  # an object store holds only what resdiff put under the URL it was given
            (check_resdiff_store if resdiff else check_replaceable)(Path(path))
        return "replace"
    if not is_url(path) and not (Path(path) / "zarr.json").is_file():
        raise StoreConflict(f"{path} exists and is not a Zarr store, so it is neither resumed nor replaced; choose "
                            f"another {flag}")
    return "new" if is_unfinished(path) else "existing"
