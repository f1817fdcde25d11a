"""Helpers for tests and notebooks: tiny synthetic stores and store assertions.

Modelled on ``xarray.testing``: builders that make small valid stores without any
model, and assertions that compare two stores with readable failure messages.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import xarray as xr

from store.chunking import Chunking
from store.reader import open_store
from store.schema import STANDARD_PASSES, build_template, every_pass_pair
from store.writer import StoreWriter


class CountingScheduler:
    """A Dask scheduler that counts computes and fails past ``max_computes``.

    Use with ``dask.config.set(scheduler=CountingScheduler(0))`` to prove laziness.
    """

    def __init__(self, max_computes: int = 0) -> None:
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):
        import dask

        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(f"too many dask computations: {self.total_computes} > {self.max_computes}")
        return dask.get(dsk, keys, **kwargs)


def tiny_template(
    n_prompts: int = 3, n_layers1: int = 3, hidden: int = 8, lengths: tuple[int, ...] | None = None,
    store_dtype: str = "float32", chunk_prompt: int = 2, chunking: Chunking | None = None, responses: bool = False,
) -> xr.Dataset:
    """A small template with the default four passes and made-up tokens.

    ``responses`` makes it a ``capture --generate`` store's: each prompt's second half is its response.

    ``chunking`` overrides the default tiles (``chunk_prompt`` prompts x all layers); with a ``shard`` it makes
    a sharded (format 4) store's template.
    """
    lengths = lengths or tuple(5 - (i % 3) for i in range(n_prompts))
    ids = [list(range(10, 10 + n)) for n in lengths]
    starts = [max(1, n // 2) for n in lengths]
    generated = {"responses": {"response_start": starts, "stop_reason": ["length"] * n_prompts,
                               "response_text": [" ".join(f"t{i}" for i in row[s:])
                                                 for row, s in zip(ids, starts, strict=True)]},
                 "roles": [["text"] * s + ["response"] * (len(row) - s) for row, s in zip(ids, starts, strict=True)]}
    return build_template(
        passes=list(STANDARD_PASSES), texts=[f"prompt {i}" for i in range(n_prompts)],
        token_ids=ids, token_pieces=[[f"t{i}" for i in row] for row in ids], n_layers1=n_layers1,
        hidden=hidden, store_dtype=store_dtype, chunking=chunking or Chunking(prompt=chunk_prompt, layer=n_layers1),
        attrs={"pair_label": "synthetic", **({"chunking": {"prompt": chunking.prompt, "layer": chunking.layer,
                                                          "token": chunking.token, "shard": chunking.shard}}
                                            if chunking and chunking.shard else {})},
        **(generated if responses else {}),
    )


def write_tiny_store(path: str | Path, seed: int = 0, **template_kwargs) -> Path:
    """Write a complete synthetic store of random residuals (NaN on padding).

    ``template_kwargs`` go to :func:`tiny_template`; large benchmark stores use the
    same builder with more prompts, layers and a real ``chunking``.
    """
    template = tiny_template(**template_kwargs)
    writer = StoreWriter.create(path, template)
    rng = np.random.default_rng(seed)
    n_tok = template.sizes["token"]
    chunk = template.attrs.get("chunking", {}).get("shard") or template["resid"].data.chunksize[1]  # write groups
    for p in range(template.sizes["pass_"]):
        for start in range(0, template.sizes["prompt"], chunk):
            rows = slice(start, min(start + chunk, template.sizes["prompt"]))
            lengths = template.n_tokens.values[rows]
            shape = (len(lengths), template.sizes["layer"], n_tok, template.sizes["dim"])
            resid = rng.standard_normal(shape, dtype=np.float32)
            final = rng.standard_normal((len(lengths), n_tok, template.sizes["dim"]), dtype=np.float32)
            for i, n in enumerate(lengths):
                resid[i, :, n:] = np.nan
                final[i, n:] = np.nan
            writer.write_region(p, rows, resid, final)
    writer.finalize({"completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return Path(path)


def fill_lens_statistics(path: str | Path, vocab: int = 50257, seed: int = 0) -> Path:
    """Fill every lens statistic of a store written by :func:`write_tiny_store` with random
    values of the right kinds (ids below ``vocab``, NaN on padding) and flag it complete.

    The numbers mean nothing; the layout is a real capture's, for exports and benchmarks.
    """
    from store.schema import add_lens_variables, encoding

    writer = StoreWriter(path)
    ds = open_store(path)
    pairs = every_pass_pair([p["name"] for p in STANDARD_PASSES])
    chunk = ds["resid"].data.chunksize[1]
    stats = add_lens_variables(ds, pairs=pairs, top_k=20, tracked_ids=[], tracked_strs=[], chunk_prompt=chunk)
    new = stats.drop_vars([v for v in stats.variables if v in ds.variables])
    new.to_zarr(str(path), mode="a", compute=False, consolidated=False, encoding=encoding(new))
    root, rng = writer.group, np.random.default_rng(seed)
    real_glt = ds.n_tokens.values[:, None, None] > ds.token.values[None, None, :]
    for name in new.data_vars:
        if name == "lens_done":
            continue
        for start in range(0, ds.sizes["prompt"], chunk):
            shape = (*root[name].shape[:2], min(chunk, ds.sizes["prompt"] - start), *root[name].shape[3:])
            if root[name].dtype.kind == "i":
                values = rng.integers(0, vocab, shape, dtype=np.int32)
            else:
                values = rng.standard_normal(shape, dtype=np.float32)
                mask = np.broadcast_to(real_glt[start:start + shape[2]], shape[2:5])
                values[:, :, ~mask] = np.nan
            root[name][:, :, start:start + shape[2]] = values
    root["lens_done"][:] = True
    writer.finalize({"completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return Path(path)


def save_identity_lens(path: str | Path, scale: float = 3.0) -> Path:
    """Save a lens into a store written by :func:`write_tiny_store`, as ``capture --save-lens`` would: for both
    models an unembedding whose row ``i`` is ``scale * e_i`` (a vocabulary of ``dim`` tokens, token ``i`` read
    off dimension ``i``), no bias, an RMSNorm of unit weight. For the difference lens in tests and examples."""
    from store.schema import add_saved_lens_variables
    from store.writer import consolidate

    hidden = open_store(path).sizes["dim"]
    lens = add_saved_lens_variables(open_store(path), sources=["base", "sft"], vocab=hidden, hidden=hidden)
    lens[["lens_weight", "lens_bias", "lens_norm_weight", "lens_norm_bias"]].to_zarr(str(path), mode="a",
                                                                                     consolidated=False)
    writer = StoreWriter(path)
    weight = np.eye(hidden, dtype=np.float32) * scale
    for source in (0, 1):
        writer.write_saved_lens(source, weight, np.zeros(hidden), np.ones(hidden), np.zeros(hidden))
    record = {"norm_kind": "rmsnorm", "norm_eps": 1e-6, "logit_multiplier": 1.0, "logit_softcap": None}
    writer.finalize({"saved_lens": {"base": record, "sft": record}})
    consolidate(path)
    return Path(path)


def assert_stores_equal(a: str | Path | xr.Dataset, b: str | Path | xr.Dataset, *, atol: float = 0.0,
                        ignore_attrs: tuple[str, ...] = ("created_at", "completed_at", "capture_settings")) -> None:
    """Assert two stores hold the same coords and data (NaN == NaN), within ``atol``."""
    ds_a = a if isinstance(a, xr.Dataset) else open_store(a)
    ds_b = b if isinstance(b, xr.Dataset) else open_store(b)
    assert dict(ds_a.sizes) == dict(ds_b.sizes), f"sizes differ: {dict(ds_a.sizes)} vs {dict(ds_b.sizes)}"
    assert set(ds_a.variables) == set(ds_b.variables), (
        f"variables differ: {sorted(set(ds_a.variables) ^ set(ds_b.variables))}"
    )
    for name in ds_a.variables:
        va, vb = ds_a[name].values, ds_b[name].values
        if va.dtype.kind == "f":
            np.testing.assert_allclose(va, vb, atol=atol, rtol=0, equal_nan=True, err_msg=f"variable {name!r}")
        else:
            np.testing.assert_array_equal(va.astype(object), vb.astype(object), err_msg=f"variable {name!r}")
    keys = (set(ds_a.attrs) | set(ds_b.attrs)) - set(ignore_attrs)
    differing = sorted(k for k in keys if _placeless(ds_a.attrs.get(k)) != _placeless(ds_b.attrs.get(k)))
    assert not differing, f"attributes differ: {differing}"


def _placeless(value):
    """An attribute without what depends on where the store lies (model paths relative to it, ``*_from_store``)."""
    if isinstance(value, dict):
        return {k: _placeless(v) for k, v in value.items() if not str(k).endswith("_from_store")}
    return value


def chunk_files(path: str | Path, name: str) -> list[Path]:
    """The chunk files of the array ``name`` of a local store, in key order."""
    from store.integrity import chunk_files_in

    return chunk_files_in(Path(path) / name)


def damage_chunk(path: str | Path, name: str, how: str, index: int = 0, n_bytes: int = 8) -> str:
    """Fault injection: damage the ``index``-th chunk file of ``name`` and return its key (``c/0/...``).

    ``how`` is ``flip`` (invert ``n_bytes`` bytes in the middle of the file), ``truncate`` (keep its
    first half) or ``delete``.
    """
    file = chunk_files(path, name)[index]
    key = file.relative_to(Path(path) / name).as_posix()
    data = bytearray(file.read_bytes())
    if how == "flip":
        middle = len(data) // 2
        for i in range(middle, min(middle + n_bytes, len(data))):
            data[i] ^= 0xFF
        file.write_bytes(bytes(data))
    elif how == "truncate":
        file.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "delete":
        file.unlink()
    else:
        raise ValueError(f"unknown damage {how!r}; use flip, truncate or delete")
    return key
