"""Opening stores, checking that they are resdiff stores, and describing them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr

from store.chunking import real_blocks
from store.errors import StoreFormatError, StoreNotFound
from store.location import CREATING_ATTR, StorePath, is_url, normalize, read_root_metadata, xarray_kwargs
from store.schema import DIMS, FORMAT_ATTR
from store.units import format_bytes
from store.validate import check_attrs, check_dataset, check_lengths_match_ids, check_version


def _read_root(path: StorePath, storage_options: dict | None = None) -> dict:
    """The store's root ``zarr.json``, parsed."""
    if not is_url(path) and not Path(path).exists():
        raise StoreNotFound(path=path)
    try:
        raw = read_root_metadata(path, storage_options)
    except OSError as exc:
        detail = f"zarr.json is unreadable ({exc})"
        raise StoreFormatError(path=path, detail=detail) from None
    if raw is None:
        if is_url(path):
            raise StoreNotFound(path=path)
        raise StoreFormatError(path=path, detail="it has no zarr.json (not a Zarr v3 store)"
        )
    try:
        root = json.loads(raw)
    except ValueError as exc:
        detail = f"zarr.json is unreadable ({exc})"
        raise StoreFormatError(path=path, detail=detail) from None
    if not isinstance(root, dict) or not isinstance(root.get("attributes", {}), dict):
        raise StoreFormatError(path=path, detail="its zarr.json is not a Zarr group's metadata (attributes missing "
                                                 "or not a mapping)")
    return root


def _read_attrs(path: StorePath, storage_options: dict | None = None) -> dict:
    return _read_root(path, storage_options).get("attributes", {})


def has_consolidated_metadata(path: StorePath, storage_options: dict | None = None) -> bool:
    """Whether the store's root metadata carries the consolidated metadata of its arrays."""
    return _read_root(normalize(path), storage_options).get("consolidated_metadata") is not None


def is_unfinished(path: StorePath) -> bool:
    """True for a store at a URL whose template was being written when its capture stopped."""
    try:
        return bool(_read_attrs(normalize(path)).get(CREATING_ATTR))
    except (StoreNotFound, StoreFormatError):
        return False


def check_store(path: StorePath, storage_options: dict | None = None) -> dict:
    """Return the store's attributes after checking its format version."""
    path = normalize(path)
    attrs = _read_attrs(path, storage_options)
    if attrs.get(CREATING_ATTR):
        raise StoreFormatError(path=path, detail="its template was never finished (the capture that made it stopped "
            "early); rerun the capture command to replace it")
    check_version(path, attrs.get(FORMAT_ATTR))
    check_attrs(path, attrs)
    return attrs


def open_store(path: StorePath, storage_options: dict | None = None, dask: bool = True) -> xr.Dataset:
    """Open a store lazily (Dask-backed) after checking it.

    Equivalent to ``xr.open_zarr(path)`` plus validation; nothing is loaded but the small labels and the
    completion flags (``done``, ``lens_done``: a snapshot as of opening). Regions not yet written read as NaN:
    mask with ``ds.done`` while a capture runs.
    ``dask=False`` gives xarray's lazily indexed arrays instead (``chunks=None``): a selection
    then reads only its chunks, straight from Zarr, without a Dask graph (for code that reads
    block by block itself).

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> ds = open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr"))
    >>> ds.resid.sel(pass_="SS").dims
    ('prompt', 'layer', 'token', 'dim')
    """
    path = normalize(path)
    check_store(path, storage_options)
    # A store whose consolidated metadata is missing (its capture killed while it finished, before format 3)
    # opens from each array's own metadata, silently; rerunning its capture repairs it.
    where = {**xarray_kwargs(path, storage_options), "consolidated": has_consolidated_metadata(path, storage_options)}
    if not dask:
        ds = xr.open_zarr(str(path), chunks=None, **where)
        validate_opened(path, ds, storage_options)
        return ds
    ds = xr.open_zarr(str(path), **where)
    # One-dimensional labels (pass models, prompt texts, pair sides...) are tiny and are read
    # to pick data, so load them now, straight from Zarr (no Dask computation); per-token
    # labels stay lazy like the data.
    names = [name for name, coord in ds.coords.items() if coord.ndim == 1 and name not in ds.dims]
    if names:
        eager = xr.open_zarr(str(path), chunks=None, **where)
        ds = ds.assign_coords({name: eager[name].load() for name in names})
    if not is_url(path):
        # The flags are read by every command; through Dask they are a task per chunk (one per region a
        # capture writes: 0.7 s on 1,100 prompts), straight from the chunk files a few milliseconds.
        ds = ds.assign({name: ds[name].copy(data=ArrayRegions(path, name).read(tuple(slice(0, n) for n in
                                                                                     ds[name].shape)))
                        for name in _FLAGS if name in ds.data_vars})
    validate_opened(path, ds, storage_options)
    return skip_padding_chunks(ds, None if is_url(path) else path)


def validate_opened(path: StorePath, ds: xr.Dataset, storage_options: dict | None = None) -> None:
    """Check the small labels of an opened store against the schema, lengths against the stored token ids
    included (``store.validate``); :class:`StoreFormatError` names the first bad field."""
    check_dataset(path, ds)
    if "token_id" in ds.coords and "n_tokens" in ds.coords:
        ids = ArrayRegions(path, "token_id", storage_options).read(tuple(slice(0, n) for n in ds.token_id.shape))
        check_lengths_match_ids(path, ds, ids)


_FLAGS = ("done", "lens_done")  # per-region completion flags, small


# Per numpy dtype kind; strings ("T": numpy's StringDType, which xarray reads Zarr v3 strings as) are "".
_FILL = {"f": np.nan, "i": -1, "u": 0, "b": False, "O": "", "T": "", "U": ""}


def _padding_block(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    # A read-only view of one value: a padding chunk costs no memory and no read.
    return np.broadcast_to(np.array(_FILL[dtype.kind], dtype=dtype), shape)


def is_padding_block(block: np.ndarray) -> bool:
    """True for a chunk :func:`skip_padding_chunks` made up (it holds only padding; nothing was read)."""
    return block.ndim > 0 and block.size > 1 and not any(block.strides)


class ArrayRegions:
    """Reads rectangular regions of one array of a store; for a local store straight from its
    chunk files (picklable: reopens). A region of many small chunks costs about a third of what
    zarr-python spends on it, and a third again of reading it chunk by chunk through xarray's
    indexing adapters; and it is one task, not one per chunk. Other stores read through zarr.
    """

    def __init__(self, path: StorePath, name: str, storage_options: dict | None = None):
        self.path, self.name, self.storage_options = path, name, storage_options
        self._array, self._direct = None, None

    def __getstate__(self) -> dict:
        return {"path": self.path, "name": self.name, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def array(self):
        """The zarr array (opened on first use)."""
        if self._array is None:
            import zarr

            from store.location import zarr_store
            from store.shard_io import direct_files

            group = zarr.open_group(store=zarr_store(self.path, self.storage_options, read_only=True), mode="r")
            self._array = group[self.name]
            self._direct = direct_files(self._array)
        return self._array

    def read(self, index: tuple) -> np.ndarray:
        """The region ``index`` (a slice per axis): chunk files read directly where the codecs allow
        (``store.chunk_io``), else through zarr."""
        array = self.array
        if self._direct is not None and self._direct.readable(index):
            return self._direct.read(index)
        return array[index]


# skip-padding layer name -> the array it reads. The name is a token of xarray's own graph for that array
# (path, variable, chunks), so a match is exact; entries are a path and a name.
_DIRECT: dict[str, ArrayRegions] = {}


def direct_regions(var: xr.DataArray) -> ArrayRegions | None:
    """Region reads for ``var`` when it is a ragged local store's variable exactly as :func:`open_store`
    gave it (no selection, no arithmetic); None otherwise (read it through its Dask graph)."""
    return _DIRECT.get(getattr(var.data, "name", None))


def _read_block(regions: ArrayRegions, where: tuple) -> np.ndarray:
    return regions.read(where)


class _SkipLayer(Mapping):
    """The tasks of a skip-padding array, made when asked for, not stored: a store of many prompts and token
    chunks has hundreds of thousands of chunks per variable, and a dict of them all for every variable took
    a gigabyte before anything was read. A padding block's task is a view; a real block's reads its chunk
    file directly where ``regions`` is given (checksum verified: a bad chunk raises ``CorruptChunk`` naming
    it), else it is the original zarr task."""

    def __init__(self, name: str, data, real: np.ndarray, p_axis: int, t_axis: int,
                 regions: ArrayRegions | None) -> None:
        self.name, self.source, self.chunks, self.dtype = name, data.name, data.chunks, data.dtype
        self.real, self.p_axis, self.t_axis, self.numblocks = real, p_axis, t_axis, data.numblocks
        self.regions = regions
        self.starts = [np.cumsum((0, *c)).tolist() for c in data.chunks]

    def __getitem__(self, key):
        if not (isinstance(key, tuple) and key and key[0] == self.name and len(key) == len(self.numblocks) + 1):
            raise KeyError(key)
        index = key[1:]
        if not all(isinstance(i, int) and 0 <= i < n for i, n in zip(index, self.numblocks, strict=True)):
            raise KeyError(key)
        if self.real[index[self.p_axis], index[self.t_axis]]:
            if self.regions is None:
                return (self.source, *index)
            where = tuple(slice(starts[i], starts[i + 1]) for starts, i in zip(self.starts, index, strict=True))
            return (_read_block, self.regions, where)
        shape = tuple(self.chunks[axis][i] for axis, i in enumerate(index))
        return (_padding_block, shape, self.dtype)

    def __iter__(self):
        return ((self.name, *index) for index in np.ndindex(*self.numblocks))

    def __len__(self) -> int:
        return int(np.prod(self.numblocks, dtype=np.int64))


def _skip_in(var: xr.DataArray, n_tokens_p: np.ndarray, regions: ArrayRegions | None = None) -> xr.DataArray:
    import dask
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    data = var.data
    p_axis, t_axis = var.dims.index("prompt"), var.dims.index("token")
    chunk_prompt, chunk_token = data.chunks[p_axis][0], data.chunks[t_axis][0]
    real = real_blocks(n_tokens_p, chunk_prompt, chunk_token, var.sizes["token"])
    if real.all() and regions is None:
        return var
    name = "skip-padding-" + dask.base.tokenize(data, chunk_prompt, chunk_token, regions is not None)
    graph = _SkipLayer(name, data, real, p_axis, t_axis, regions)
    layers = HighLevelGraph.from_collections(name, graph, dependencies=[data])  # culled when no task uses it
    if regions is not None and var.dtype.kind == "f":  # floats: no decoding but NaN fill: whole regions at once
        _DIRECT[name] = regions
    return var.copy(data=da.Array(layers, name, data.chunks, dtype=data.dtype, meta=data._meta))


def _direct_reader(group, name: str, path: Path) -> ArrayRegions | None:
    """Chunk-file or shard reads of the variable ``name`` when its codecs allow them (``store.chunk_io``,
    ``store.shard_io``) and xarray decodes nothing (numbers and booleans: their fill value is what zarr reads
    too)."""
    from store.shard_io import direct_files

    array = group[name]
    if array.dtype.kind not in "fiub" or direct_files(array) is None:
        return None
    return ArrayRegions(path, name)


def skip_padding_chunks(ds: xr.Dataset, path: StorePath | None = None) -> xr.Dataset:
    """``ds`` with every chunk that holds only padding made up instead of read.

    Such chunks are never written (the prompts are laid out longest first and cut into
    token chunks, see ``store.chunking``); a plain ``xr.open_zarr`` reads them as the fill
    value. Here they become read-only views of NaN (-1 for ids, "" for strings) that cost
    no read and no memory, and that the analysis kernels recognise and skip
    (:func:`is_padding_block`). Lazy: nothing is computed. ``path``, the local store ``ds`` was
    opened from, lets analysis read whole regions of its data variables (:func:`direct_regions`).
    """
    if "n_tokens" not in ds.coords or "token" not in ds.dims:
        return ds
    n_tokens_p = np.asarray(ds["n_tokens"].values)
    names = [name for name, var in ds.variables.items()
             if "prompt" in var.dims and "token" in var.dims and var.chunks is not None]
    readers = dict.fromkeys(names)
    if path is not None:
        import zarr

        group = zarr.open_group(str(path), mode="r")
        readers = {name: _direct_reader(group, name, path) for name in names}
    return ds.assign({name: _skip_in(ds[name], n_tokens_p, readers[name]) for name in names if name in ds.data_vars}
                     ).assign_coords({name: _skip_in(ds[name], n_tokens_p) for name in names if name in ds.coords})


def stored_bytes(ds: xr.Dataset, names: list[str]) -> int:
    """Bytes (before compression) of the chunks of ``names`` that hold real tokens, the ones a capture writes."""
    total = 0
    for name in names:
        var = ds[name]
        if not var.chunks or "token" not in var.dims:
            total += var.nbytes
            continue
        chunk_bytes = int(np.prod([c[0] for c in var.chunks], dtype=np.int64)) * var.dtype.itemsize
        p_axis, t_axis = var.dims.index("prompt"), var.dims.index("token")
        real = real_blocks(np.asarray(ds.n_tokens.values), var.chunks[p_axis][0], var.chunks[t_axis][0],
                           var.sizes["token"])
        others = int(np.prod([len(c) for axis, c in enumerate(var.chunks) if axis not in (p_axis, t_axis)]))
        total += int(real.sum()) * others * chunk_bytes
    return total


def _describe_pass(ds: xr.Dataset, i: int) -> str:
    """One pass's recipe: ``BB=(base LLM, base emb, base unemb)``; a crossed pass names its lower body too."""
    name, llm, emb, unemb = (str(ds[c].values[i]) for c in ("pass_", "model", "embedding", "unembedding"))
    if "lower_body" in ds.coords and str(ds.lower_body.values[i]) != llm:
        return f"{name}=({emb} emb, {ds.lower_body.values[i]} blocks < {int(ds.split_layer.values[i])}, {llm} " \
               f"blocks from there, {unemb} unemb)"
    return f"{name}=({llm} LLM, {emb} emb, {unemb} unemb)"


def describe_store(path: str | Path) -> str:
    """A short human summary: dims, passes, models, completeness."""
    ds = open_store(path)
    attrs = ds.attrs
    done = np.asarray(ds["done"].values, dtype=bool)
    models = attrs.get("models", {})
    settings = attrs.get("capture_settings", {})
    if "resid" in ds:
        content = f"{format_bytes(stored_bytes(ds, ['resid', 'final']))} of residuals as {ds['resid'].dtype}"
    else:
        content = f"statistics only, imported from {attrs.get('imported_from')}"
    n_tokens = np.asarray(ds.n_tokens.values)
    lines = [
        f"store      {path}  (format {attrs.get(FORMAT_ATTR)}, {content})",
        "dims       " + ", ".join(f"{k}={ds.sizes[k]}" for k in DIMS if k in ds.sizes),
        f"base       {models.get('base', {}).get('ref', '?')}",
        f"sft        {models.get('sft', {}).get('ref', '?')}",
        f"model      {attrs.get('model_dtype', '?')} on {attrs.get('device', '?')}, "
        f"{settings.get('model_pair', settings.get('pair')) or 'custom pair'}",
        "passes     " + ", ".join(_describe_pass(ds, i) for i in range(ds.sizes["pass_"])),
        f"prompts    {ds.sizes['prompt']}: {int(n_tokens.sum())} tokens stored, {int(n_tokens.min())} to "
        f"{int(n_tokens.max())} per prompt (median {float(np.median(n_tokens)):g})",
        f"complete   {int(done.sum())}/{done.size} pass x prompt regions"
        + ("" if done.all() else "  (incomplete: rerun the same capture command to resume)"),
    ]
    if "response_start" in ds.coords:
        gen = attrs.get("generation", {})
        response = n_tokens - np.asarray(ds.response_start.values)
        stops = np.array([str(s) for s in ds.stop_reason.values])
        counts = ", ".join(f"{reason} {int((stops == reason).sum())}" for reason in sorted(set(stops)))
        lines.append(f"responses  up to {gen.get('new_tokens', '?')} tokens by the {gen.get('model', '?')} model "
                     f"({gen.get('decoding', '?')}): {int(response.sum())} response tokens, median "
                     f"{float(np.median(response)):g}; stopped by {counts}")
    if "lens_done" in ds:
        lens_done = np.asarray(ds["lens_done"].values, dtype=bool)
        tracked = ", ".join(str(t) for t in ds.tracked_str.values) if "tracked_str" in ds.coords else ""
        lines.append(
            f"lens       {', '.join(ds.lens.values)} lens; top-{ds.sizes.get('k', 0)}; "
            f"pairs {', '.join(ds.pair.values) or 'none'}; tracked: {tracked or 'none'}; "
            f"{int(lens_done.sum())}/{lens_done.size} prompts done"
            + ("; lens saved" if "saved_lens" in attrs else "")
        )
    if "resid" in ds:
        chunks = ds["resid"].encoding.get("chunks") or ds["resid"].data.chunksize
        stats = [name for name in ds.data_vars if name not in ("resid", "final") and "token" in ds[name].dims]
        padded = format_bytes(ds.resid.nbytes + ds.final.nbytes)
        lines.append(f"chunks     resid {tuple(int(c) for c in chunks)}; stored before compression: residuals "
                     f"{format_bytes(stored_bytes(ds, ['resid', 'final']))} of {padded} padded, lens statistics "
                     f"{format_bytes(stored_bytes(ds, stats))}")
    if settings.get("layers"):
        lines.append(f"layers     {', '.join(str(int(la)) for la in ds.layer.values)} (of a capture with --layers)")
    positions = attrs.get("content_fingerprint", {}).get("positions")
    if positions not in (None, "all"):
        lines.append(f"positions  {positions} of each prompt (token_position gives each one's place)")
    if attrs.get("completed_at"):
        lines.append(f"captured   {attrs['completed_at']}")
    return "\n".join(lines)
