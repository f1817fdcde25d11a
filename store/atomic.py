"""Every output resdiff writes is written under a temporary name and renamed when complete.

One helper does it for files and directories alike (stores, JSON, netCDF, CSV/parquet,
decompositions, pictures, the tiny pair): whatever fails inside the block, the temporary
is removed and the final name still holds what it held before (or nothing), never a
half-written output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: str | Path, *, suffix: str = ".partial", unique: bool = False,
                  keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; rename it to ``path`` when the block succeeds.

    The temporary is ``NAME{suffix}`` (a leftover from a crash is replaced), or with
    ``unique`` a fresh name per call, for writers that may run at once. On success an
    existing ``path`` is replaced, or, with ``keep_existing``, kept and ours discarded
    (another writer finished the same output first). On failure the temporary is removed.

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_output(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text(), tmp.exists()
    ('done', False)
    """
    path = Path(path)
    name = f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}" if unique else path.name + suffix
    tmp = path.with_name(name)
    remove_path(tmp)
    try:
        yield tmp
        if keep_existing and path.exists():
            remove_path(tmp)
            return
        if path.is_dir() and tmp.is_dir():
            remove_path(path)  # a directory cannot be renamed over a non-empty one
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


@contextlib.contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; when the block succeeds, move every file written there
    into ``out`` (replacing files of the same name, keeping the others), and when it fails remove it: a failed
    run adds nothing to ``out`` and changes nothing in it.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "plots"
    >>> with staged_directory(out) as stage:
    ...     _ = (stage / "a.png").write_bytes(b"png")
    >>> sorted(p.name for p in out.iterdir()), stage.exists()
    (['a.png'], False)
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    stage.mkdir()
    try:
        yield stage
        out.mkdir(exist_ok=True)
        for file in sorted(f for f in stage.rglob("*") if f.is_file()):
            target = out / file.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        remove_path(stage)
