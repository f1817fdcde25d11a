"""The store contract: dimensions, coordinates, chunking and the empty template.

Axes legend: pass_ = forward pass (BB, BS, ...), prompt, layer (0..L), token
(position), dim (hidden unit). See ``docs/store-format.md`` for the full contract;
bump :data:`FORMAT_VERSION` whenever a reader of the old layout would misread the new.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
import zarr

FORMAT_VERSION = 1
FORMAT_ATTR = "resdiff_format_version"
DIMS = ("pass_", "prompt", "layer", "token", "dim")
TARGET_CHUNK_BYTES = 16 * 2**20
STORE_DTYPES = ("float16", "float32")
LAYER_SEMANTICS = (
    "layer 0 = input of the first decoder block (embedding output, hidden_states[0]); "
    "layer l >= 1 = raw residual stream after block l-1, before the final norm; "
    "the final-norm output is the separate variable `final`"
)


@dataclass(frozen=True)
class Chunking:
    """Chunk sizes along prompt and layer; pass_ is 1 and token, dim are whole."""

    prompt: int
    layer: int


def choose_chunking(
    n_prompts: int, n_layers1: int, n_tokens: int, hidden: int, itemsize: int,
    target_bytes: int = TARGET_CHUNK_BYTES,
) -> Chunking:
    """Tile (prompt x layer) so a chunk is about ``target_bytes``, as square as possible.

    Reading one layer across prompts wastes a factor ``layer`` of the bytes read and
    reading one prompt across layers a factor ``prompt``; a square tile bounds both.

    >>> choose_chunking(1000, 29, 128, 1536, 2)
    Chunking(prompt=7, layer=6)
    """
    slab = max(1, n_tokens * hidden * itemsize)
    budget = max(1, target_bytes // slab)
    layer = min(n_layers1, max(1, math.isqrt(budget)))
    prompt = min(n_prompts, max(1, budget // layer))
    if prompt == n_prompts:
        layer = min(n_layers1, max(layer, budget // prompt))
    return Chunking(prompt=prompt, layer=layer)


def write_groups(n_prompts: int, chunk_prompt: int, batch_size: int) -> list[slice]:
    """Prompt ranges written at once: whole chunks, at least one compute batch each."""
    size = chunk_prompt * max(1, -(-batch_size // chunk_prompt))
    return [slice(start, min(start + size, n_prompts)) for start in range(0, n_prompts, size)]


def _strings(values) -> np.ndarray:
    # Object dtype becomes variable-length UTF-8 in Zarr v3; fixed-width '<U' warns.
    return np.array(values, dtype=object)


def build_template(
    *,
    passes: list[dict[str, str]],
    texts: list[str],
    token_ids: list[list[int]],
    token_pieces: list[list[str]],
    n_layers1: int,
    hidden: int,
    store_dtype: str,
    chunking: Chunking,
    attrs: dict,
    prompt_index: list[int] | None = None,
    variants: list[str] | None = None,
) -> xr.Dataset:
    """The full-size, lazily NaN-filled Dataset written before any region."""
    n_pass, n_prompts = len(passes), len(texts)
    n_tokens = max(len(ids) for ids in token_ids)
    ids_pt = np.full((n_prompts, n_tokens), -1, dtype=np.int32)
    pieces_pt = np.full((n_prompts, n_tokens), "", dtype=object)
    for row, (ids, pieces) in enumerate(zip(token_ids, token_pieces, strict=True)):
        ids_pt[row, : len(ids)] = ids
        pieces_pt[row, : len(pieces)] = pieces
    cp, cl = chunking.prompt, chunking.layer
    resid = da.full((n_pass, n_prompts, n_layers1, n_tokens, hidden), np.nan, dtype=store_dtype,
                    chunks=(1, cp, cl, n_tokens, hidden))
    final = da.full((n_pass, n_prompts, n_tokens, hidden), np.nan, dtype=store_dtype,
                    chunks=(1, cp, n_tokens, hidden))
    done = da.zeros((n_pass, n_prompts), dtype=bool, chunks=(1, cp))
    return xr.Dataset(
        {
            "resid": (DIMS, resid, {"long_name": "residual stream", "layer_semantics": LAYER_SEMANTICS}),
            "final": (("pass_", "prompt", "token", "dim"), final, {"long_name": "final-norm output"}),
            "done": (("pass_", "prompt"), done, {"long_name": "region fully written"}),
        },
        coords={
            "pass_": ("pass_", _strings([p["name"] for p in passes])),
            "model": ("pass_", _strings([p["llm"] for p in passes])),
            "embedding": ("pass_", _strings([p["embedding"] for p in passes])),
            "unembedding": ("pass_", _strings([p["unembedding"] for p in passes])),
            "prompt": ("prompt", np.arange(n_prompts, dtype=np.int64)),
            "prompt_text": ("prompt", _strings(texts)),
            "prompt_index": ("prompt", np.asarray(prompt_index or range(n_prompts), dtype=np.int64)),
            "variant": ("prompt", _strings(variants or ["identity"] * n_prompts)),
            "n_tokens": ("prompt", np.array([len(i) for i in token_ids], dtype=np.int32)),
            "layer": ("layer", np.arange(n_layers1, dtype=np.int64)),
            "token": ("token", np.arange(n_tokens, dtype=np.int64)),
            "token_id": (("prompt", "token"), ids_pt),
            "token_str": (("prompt", "token"), pieces_pt),
        },
        attrs={FORMAT_ATTR: FORMAT_VERSION, **attrs},
    )


def encoding(ds: xr.Dataset) -> dict[str, dict]:
    """Zstd for the float arrays: cheap, and it still saves a little on activations."""
    zstd = zarr.codecs.ZstdCodec(level=3)
    return {name: {"compressors": [zstd]} for name in ("resid", "final") if name in ds}
