"""One writer per store: an exclusive lock held for a whole capture, resume, overwrite or import.

A local store's lock is the file ``.NAME.lock`` beside it (so it outlives ``--overwrite``,
which removes the store itself), locked with ``flock``. The operating system releases the
lock when its holder exits, however it exits, so the lock of a killed run is simply taken
over; the file's text (pid, host, start time, command) only names the holder in the refusal.
Readers take no lock: they trust the ``done`` flags, which are set after their data.

An object store has no such lock. There, a marker object ``NAME.lock`` beside the store names
the writer while it runs; a second writer that finds it refuses. The check and the write are
not atomic (two writers starting in the same instant both pass), and a killed run leaves its
marker behind: the refusal says how to delete it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from store.atomic import remove_path
from store.errors import StoreLocked
from store.location import StorePath, filesystem, is_url, normalize

_held: dict[str, int] = {}  # lock paths this process holds -> depth (a capture inside a sweep locks once)


def lock_path(path: StorePath) -> StorePath:
    """Where the lock of the store at ``path`` lives: ``.NAME.lock`` beside a local store, ``NAME.lock`` beside
    one at a URL."""
    path = normalize(path)
    if is_url(path):
        return f"{path}.lock"
    return path.with_name(f".{path.name}.lock")


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv)[:300]})


def _describe(text: str) -> str:
    try:
        info = json.loads(text)
        return f"process {info['pid']} on {info['host']} since {info['since']} ({info.get('command') or '?'})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def remove_leftover_staging(path: Path) -> None:
    """Remove the staging directories that killed runs left beside ``path`` (only under its lock: then no
    run is staging there)."""
    for leftover in [path.with_name(path.name + ".creating"), *path.parent.glob(f".{path.name}.*.creating"),
                     *path.parent.glob(f".{path.name}.*.partial")]:
        remove_path(leftover)


@contextlib.contextmanager
def store_lock(path: StorePath, storage_options: dict | None = None) -> Iterator[None]:
    """Hold the store's writer lock for the block; raise :class:`StoreLocked` (touching nothing) when another
    process holds it.

    >>> import tempfile
    >>> store = Path(tempfile.mkdtemp()) / "s.zarr"
    >>> with store_lock(store), store_lock(store):  # re-entrant within a process
    ...     lock_path(store).name
    '.s.zarr.lock'
    """
    path = normalize(path)
    where = str(lock_path(path))
    if where in _held:
        _held[where] += 1
        try:
            yield
        finally:
            _held[where] -= 1
        return
    manager = _url_marker(where, storage_options) if is_url(path) else _file_lock(Path(where), path)
    with manager:
        _held[where] = 1
        try:
            yield
        finally:
            del _held[where]


@contextlib.contextmanager
def _file_lock(where: Path, store: Path) -> Iterator[None]:
    where.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(where, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLocked(path=store, holder=_describe(where.read_text(errors="replace"))) from None
        # The file itself stays: unlinking it would let a waiting process lock a file no one else sees.
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        remove_leftover_staging(store)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _url_marker(where: str, storage_options: dict | None) -> Iterator[None]:
    fs, key = filesystem(where, storage_options)
    if fs.exists(key):
        holder = _describe(fs.cat_file(key).decode(errors="replace"))
        raise StoreLocked(f"store {where.removesuffix('.lock')} is being written by {holder} (its marker {where} "
                          "is present); wait for that run to finish, or, if none is running (a killed run leaves "
                          "its marker), delete the marker and rerun")
    fs.pipe_file(key, _holder_text().encode())
    try:
        yield
    finally:
        fs.rm(key)
