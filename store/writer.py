"""Writing a store incrementally: a template first, then whole-chunk regions, each
followed by its ``done`` flag.

Regions are written with zarr directly (not through xarray) because they are plain
array slices of a layout the template already fixed; the ``done`` flag of a region is
set only after all its data has been written, so a reader that trusts ``done`` never
sees a half-written region.
"""

from __future__ import annotations

import os
import shutil
import signal
import warnings

import numpy as np
import xarray as xr
import zarr

from capture.errors import StoreFormatError
from store.location import CREATING_ATTR, StorePath, is_url, normalize, remove, xarray_kwargs, zarr_store
from store.schema import FORMAT_ATTR, encoding


def consolidate(path: StorePath, storage_options: dict | None = None) -> None:
    """Consolidate metadata so that a plain ``xr.open_zarr(path)`` opens fast and silently."""
    with warnings.catch_warnings():
        # Zarr 3 warns that consolidated metadata is not in the v3 spec; we rely on it on purpose.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(zarr_store(path, storage_options))


FAULT_ENV = "RESDIFF_FAULT"
_fault_counts: dict[str, int] = {}


def fault_point(kind: str) -> None:
    """Testing hook: with ``RESDIFF_FAULT=KIND:N`` the process kills itself (SIGKILL) at the N-th
    ``fault_point(KIND)``. The crash-resume tests use it to die in the middle of a write; unset, it
    does nothing."""
    wanted = os.environ.get(FAULT_ENV, "")
    if not wanted.startswith(kind + ":"):
        return
    _fault_counts[kind] = _fault_counts.get(kind, 0) + 1
    if _fault_counts[kind] == int(wanted.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_store(path: StorePath, storage_options: dict | None = None) -> None:
    path = normalize(path)
    if is_url(path):
        remove(path, storage_options)
        return
    if path.is_dir() and not (path / "zarr.json").exists():
        raise StoreFormatError.from_template(
            "store_format", path=path, detail="it is a directory but not a Zarr store, so it was not removed"
        )
    shutil.rmtree(path, ignore_errors=False) if path.is_dir() else path.unlink(missing_ok=True)


class StoreWriter:
    """Region writer for a store whose template already exists.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from store.testing import tiny_template
    >>> path = tempfile.mkdtemp() + "/s.zarr"
    >>> writer = StoreWriter.create(path, tiny_template())
    >>> writer.write_region(0, slice(0, 2), np.zeros((2, 3, 5, 8)), np.zeros((2, 5, 8)))
    >>> writer.done_pp()[0].tolist()
    [True, True, False]
    """

    def __init__(self, path: StorePath, storage_options: dict | None = None) -> None:
        self.path = normalize(path)
        self.storage_options = storage_options
        self.group = zarr.open_group(store=zarr_store(self.path, storage_options), mode="r+", use_consolidated=False)

    @classmethod
    def create(cls, path: StorePath, template: xr.Dataset, storage_options: dict | None = None) -> StoreWriter:
        """Write the template (metadata, coordinates, no data chunks) and consolidate it.

        It is written under a temporary name and renamed, so a crash never leaves a
        half-made store at ``path`` (a leftover ``*.creating`` directory is replaced).
        At an fsspec URL it is written in place, marked unfinished until the end.
        """
        path = normalize(path)
        if is_url(path):
            return cls._create_in_place(path, template, storage_options)
        staging = path.with_name(path.name + ".creating")
        if staging.exists():
            shutil.rmtree(staging)
        try:
            template.to_zarr(str(staging), mode="w-", compute=False, encoding=encoding(template), consolidated=False)
            consolidate(staging)
            staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(path)

    @classmethod
    def _create_in_place(cls, url: str, template: xr.Dataset, storage_options: dict | None) -> StoreWriter:
        remove(url, storage_options)  # the caller replaces only missing or unfinished stores
        marked = template.copy(deep=False)
        marked.attrs = {k: v for k, v in template.attrs.items() if k != FORMAT_ATTR} | {CREATING_ATTR: True}
        marked.to_zarr(url, mode="w-", compute=False, encoding=encoding(marked), consolidated=False,
                       **xarray_kwargs(url, storage_options))
        writer = cls(url, storage_options)
        writer.group.attrs.update({FORMAT_ATTR: template.attrs[FORMAT_ATTR]})
        del writer.group.attrs[CREATING_ATTR]
        consolidate(url, storage_options)
        return writer

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def done_pp(self) -> np.ndarray:
        """The ``done(pass_, prompt)`` flags as a numpy bool array."""
        return np.asarray(self.group["done"][...], dtype=bool)

    def lens_done(self) -> np.ndarray:
        """The ``lens_done(prompt)`` flags; all True when the store has no lens statistics."""
        if "lens_done" not in self.group:
            return np.ones(self.group["done"].shape[1], dtype=bool)
        return np.asarray(self.group["lens_done"][...], dtype=bool)

    def write_region(self, pass_index: int, prompts: slice, resid_gltd: np.ndarray, final_gtd: np.ndarray) -> None:
        """Write one pass x prompt-group region, then flag it done."""
        resid, final = self.group["resid"], self.group["final"]
        resid[pass_index, prompts] = resid_gltd.astype(resid.dtype, copy=False)
        fault_point("region")  # a crash here leaves data without its done flag: rewritten on resume
        final[pass_index, prompts] = final_gtd.astype(final.dtype, copy=False)
        self.group["done"][pass_index, prompts] = True

    def write_saved_lens(self, source: int, weight_vd, bias_v, norm_weight_d, norm_bias_d) -> None:
        """Write one unembedding's parameters (``--save-lens``)."""
        self.group["lens_weight"][source] = np.asarray(weight_vd, dtype=np.float32)
        self.group["lens_bias"][source] = np.asarray(bias_v, dtype=np.float32)
        self.group["lens_norm_weight"][source] = np.asarray(norm_weight_d, dtype=np.float32)
        self.group["lens_norm_bias"][source] = np.asarray(norm_bias_d, dtype=np.float32)

    def finalize(self, attrs: dict) -> None:
        """Record closing attributes (completion time, ...) and re-consolidate."""
        self.group.attrs.update(attrs)
        consolidate(self.path, self.storage_options)

    def format_version(self) -> int | None:
        return self.attrs.get(FORMAT_ATTR)
