"""Where a store lives: a local directory, or an fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``).

Local paths keep the local-file guarantees (a template written under a temporary name
and renamed). On object storage there is no rename: the template is written in place
with a ``resdiff_creating`` attribute and no format version, which is set last, so a
half-made template is recognised and replaced rather than read.

Options for the file system (credentials, ``endpoint_url``...) come from
:class:`set_storage_options` (``--storage-option KEY=VALUE`` on the command line; scoped), from
the ``storage_options`` argument where a function takes one, or from fsspec's own
configuration and the provider's environment variables.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from store.errors import UsageError

_STORAGE_OPTIONS: dict = {}  # set by set_storage_options (scoped), read by current_storage_options()
CREATING_ATTR = "resdiff_creating"

StorePath = str | Path


def sanitize_label(text: str) -> str:
    """Runs of non-alphanumerics become one ``_``: ``Qwen/Qwen2.5-0.5B`` -> ``Qwen_Qwen2_5_0_5B``."""
    return re.sub(r"[^0-9A-Za-z]+", "_", text).strip("_")


class set_storage_options:  # lower case: called like a function, used as a context manager (xarray.set_options)
    """Options for every fsspec URL this process opens while they are in effect (the CLI's ``--storage-option``).

    As a context manager they are undone on exit, as ``xarray.set_options`` does; called plainly (a notebook's
    setting) they stay until set again. Threads see them (Dask's among them); worker processes do not, so the
    code that starts them hands them :func:`current_storage_options`.

    Examples
    --------
    >>> with set_storage_options({"anon": True}):
    ...     current_storage_options()
    {'anon': True}
    >>> current_storage_options()
    {}
    """

    def __init__(self, options: dict) -> None:
        self._before = dict(_STORAGE_OPTIONS)
        _STORAGE_OPTIONS.clear()
        _STORAGE_OPTIONS.update(options)

    def __enter__(self) -> set_storage_options:
        return self

    def __exit__(self, *exc) -> None:
        _STORAGE_OPTIONS.clear()
        _STORAGE_OPTIONS.update(self._before)


def current_storage_options() -> dict:
    """A copy of the options :class:`set_storage_options` put in effect."""
    return dict(_STORAGE_OPTIONS)


def parse_storage_options(pairs: list[str] | None) -> dict:
    """``["endpoint_url=http://h:9000", "anon=false", "client_kwargs.region_name=eu"]`` -> nested dict.

    Values are read as JSON where they parse (``false``, ``3``), else kept as text.

    >>> parse_storage_options(["anon=false", "client_kwargs.region_name=eu-west-1"])
    {'anon': False, 'client_kwargs': {'region_name': 'eu-west-1'}}
    """
    options: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--storage-option takes KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        node = options
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return options


def is_url(path: StorePath | None) -> bool:
    """True for a remote or in-memory fsspec URL; ``file://`` URLs are local paths."""
    return path is not None and "://" in str(path) and not str(path).startswith("file://")


def normalize(path: StorePath) -> StorePath:
    """A URL stays text (``Path`` would fold ``s3://`` into ``s3:/``); a local path or ``file://`` URL
    becomes a ``Path``.

    >>> normalize("s3://bucket/a.zarr/"), normalize("file:///tmp/a.zarr")
    ('s3://bucket/a.zarr', PosixPath('/tmp/a.zarr'))
    """
    text = str(path)
    if text.startswith("file://"):
        return Path(text.removeprefix("file://"))
    return text.rstrip("/") if is_url(text) else Path(text)


def local_sibling(path: StorePath, suffix: str) -> Path:
    """A local path named after the store: beside it, or under ``outputs/`` for a store at a URL.

    >>> local_sibling("runs/a.zarr", "-plots"), local_sibling("s3://bucket/x/a.zarr", ".decomp.zarr")
    (PosixPath('runs/a-plots'), PosixPath('outputs/a.decomp.zarr'))
    """
    path = normalize(path)
    stem = Path(str(path).rsplit("/", 1)[-1]).stem
    parent = Path("outputs") if is_url(path) else path.parent
    return parent / f"{stem}{suffix}"


def _options(storage_options: dict | None) -> dict:
    return {**_STORAGE_OPTIONS, **(storage_options or {})}


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec file system, path inside it) of ``url``."""
    from fsspec.core import url_to_fs

    try:
        return url_to_fs(url, **_options(storage_options))
    except (ImportError, ValueError) as exc:
        raise UsageError(f"cannot open {url}: {exc}; install the fsspec backend for its protocol "
                         "(s3fs for s3://, gcsfs for gs://)") from None


def zarr_store(path: StorePath, storage_options: dict | None = None, read_only: bool = False):
    """What ``zarr.open_group`` takes for ``path``: the path itself, or an fsspec-backed store."""
    if not is_url(path):
        return str(path)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(str(path), storage_options=_options(storage_options), read_only=read_only)


def xarray_kwargs(path: StorePath, storage_options: dict | None = None) -> dict:
    """Keyword arguments that let ``xr.open_zarr`` / ``to_zarr`` reach ``path``."""
    return {"storage_options": _options(storage_options)} if is_url(path) else {}


def exists(path: StorePath, storage_options: dict | None = None) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, root = filesystem(str(path), storage_options)
    return fs.exists(f"{root}/zarr.json")


def read_root_metadata(path: StorePath, storage_options: dict | None = None) -> bytes | None:
    """The bytes of the store's ``zarr.json``, or None when there is none."""
    if not is_url(path):
        meta = Path(path) / "zarr.json"
        return meta.read_bytes() if meta.exists() else None
    fs, root = filesystem(str(path), storage_options)
    try:
        return fs.cat_file(f"{root}/zarr.json")
    except FileNotFoundError:
        return None


def remove(path: StorePath, storage_options: dict | None = None) -> None:
    """Delete everything under the URL ``path`` (local paths: see ``store.writer.remove_store``)."""
    fs, root = filesystem(str(path), storage_options)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def model_location(ref: str, store: StorePath) -> dict:
    """How a store records a model or tokenizer: a local directory as an absolute path (``ref``) and relative
    to a local store (``ref_from_store``, for a store and models moved together); a hub id as it is.

    >>> model_location("org/model-id", "runs/a.zarr")
    {'ref': 'org/model-id'}
    """
    path = Path(ref)
    if not path.is_dir():
        return {"ref": ref}
    record = {"ref": str(path.resolve())}
    if not is_url(store):
        record["ref_from_store"] = os.path.relpath(path.resolve(), Path(store).resolve().parent)
    return record


def find_model_dir(record: dict, store: StorePath | None, key: str = "ref") -> Path | None:
    """The local directory a model record names (``key``: ``ref`` or ``tokenizer``): its path as recorded
    (absolute since format 3; a relative one is tried from the working directory, as format 2 meant it),
    else relative to the store; None when neither exists."""
    candidates = [record.get(key)]
    if record.get(f"{key}_from_store") and store is not None and not is_url(store):
        candidates.append(str(Path(store).resolve().parent / record[f"{key}_from_store"]))
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
