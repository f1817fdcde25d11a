"""The store contract: dimensions, coordinates, chunking and the empty template.

Axes legend: pass_ = forward pass (BB, BS, ...), prompt, layer (0..L), token
(position), dim (hidden unit). See ``docs/store-format.md`` for the full contract;
bump :data:`FORMAT_VERSION` whenever a reader of the old layout would misread the new.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from store.chunking import TARGET_CHUNK_BYTES, Chunking
from store.errors import StoreFormatError
from store.units import CODECS, DEFAULT_CODEC

FORMAT_VERSION = 4
# format 1: prompts in source order, whole tokens per chunk; format 2: no chunk checksums; format 3: unsharded
READABLE_VERSIONS = (1, 2, 3, 4)
FORMAT_ATTR = "resdiff_format_version"
DIMS = ("pass_", "prompt", "layer", "token", "dim")
LAYER_SEMANTICS = (
    "layer 0 = input of the first decoder block (embedding output, hidden_states[0]); "
    "layer l >= 1 = raw residual stream after block l-1, before the final norm; "
    "the final-norm output is the separate variable `final`"
)


# The 2x2 factorial of a capture: a pass is named by its embedding source, then its LLM.
_SOURCE = {"B": "base", "S": "sft"}
STANDARD_PASSES: tuple[dict[str, str], ...] = tuple(
    {"name": e + m, "llm": _SOURCE[m], "embedding": _SOURCE[e], "unembedding": _SOURCE[m]}
    for e, m in ("BB", "BS", "SB", "SS")
)


# The ``role`` of a token that no message's content covers (role markers, a default system prompt), and of
# a plain-text prompt's tokens in a store that also holds chat conversations.
TEMPLATE_ROLE = "template"
PLAIN_ROLE = "text"
RESPONSE_ROLE = "response"  # a token the capture generated (capture --generate)


def every_pass_pair(names: list[str]) -> list[tuple[str, str, str]]:
    """(name, left, right) of every pair of passes in plan order, the default comparisons.

    >>> [q[0] for q in every_pass_pair(["BB", "BS", "SB", "SS"])]
    ['BB-BS', 'BB-SB', 'BB-SS', 'BS-SB', 'BS-SS', 'SB-SS']
    """
    return [(f"{a}-{b}", a, b) for i, a in enumerate(names) for b in names[i + 1:]]


CROSSING_TARGET = {"sft": "SS", "base": "BB"}  # the pass a crossed pass with this upper body should reproduce


def default_pass_pairs(passes: list[dict]) -> list[tuple[str, str, str]]:
    """The default comparisons of a pass plan (``pass_plan`` entries): every pair of its uncrossed passes, then
    each crossed pass against the pass whose change it should recover, ``B>S@L-SS`` and ``S>B@L-BB``
    (KL(SS || B>S@L), KL(BB || S>B@L)), then BB against each crossed pass, ``BB-B>S@L`` and ``BB-S>B@L``
    (KL(B>S@L || BB), KL(S>B@L || BB): what swapping only the upper or only the lower body does, the KL
    interaction's terms).

    >>> plan = [{"name": n, "llm": m} for n, m in (("BB", "base"), ("SS", "sft"))]
    >>> [q[0] for q in default_pass_pairs(plan + [{"name": "B>S@2", "llm": "sft", "split": 2}])]
    ['BB-SS', 'B>S@2-SS', 'BB-B>S@2']
    """
    pairs = every_pass_pair([p["name"] for p in passes if p.get("split") is None])
    names = {p["name"] for p in passes}
    crossed = [p for p in passes if p.get("split") is not None]
    for p in crossed:
        target = CROSSING_TARGET[p["llm"]]
        if target in names:
            pairs.append((f"{p['name']}-{target}", p["name"], target))
    if "BB" in names:
        pairs += [(f"BB-{p['name']}", "BB", p["name"]) for p in crossed]
    return pairs


def content_digest(values) -> str:
    """SHA-256 of a JSON-serialisable list (prompt texts, variants...), for fingerprints that must not grow
    with the number of prompts.

    >>> content_digest(["a", "b"])[:12]
    '3554d2b8a1e3'
    """
    return hashlib.sha256(json.dumps(list(values), ensure_ascii=False).encode("utf-8")).hexdigest()


def string_array(values) -> np.ndarray:
    # Object dtype becomes variable-length UTF-8 in Zarr v3; fixed-width '<U' warns.
    return np.array(list(values), dtype=object)


def _as_is(dims, strings: np.ndarray) -> xr.Variable:
    """A variable of Python strings taken as they are: given a plain object array, xarray sends every element
    through a pandas Series (an Arrow string array under pandas 3) and back, a new object per element; for
    20,000 prompts' token strings that was ~250 MiB of transient memory the capture's plan does not hold."""
    return xr.Variable(dims, strings, fastpath=True)


def build_template(
    *,
    passes: list[dict[str, str]],
    texts: list[str],
    token_ids: list[list[int]],
    token_pieces: list[list[str]],
    n_layers1: int | None = None,
    hidden: int,
    store_dtype: str,
    chunking: Chunking,
    attrs: dict,
    prompt_labels: list[int] | None = None,
    prompt_index: list[int] | None = None,
    variants: list[str] | None = None,
    layers: list[int] | None = None,
    prompt_lengths: list[int] | None = None,
    token_positions: list[list[int]] | None = None,
    roles: list[list[str]] | None = None,
    templated: list[bool] | None = None,
    responses: dict[str, list] | None = None,
) -> xr.Dataset:
    """The full-size, lazily NaN-filled Dataset written before any region.

    Every per-prompt list is in store order (longest prompt first for a capture);
    ``prompt_labels`` are the prompts' positions in source order, the ``prompt``
    coordinate. ``token_ids`` are the stored positions' ids, ``token_positions`` their
    positions in the prompt (default 0, 1, ...), ``prompt_lengths`` the prompts' full
    token counts (default: the stored counts), ``layers`` the true layer numbers kept
    (default 0..L), ``roles`` a chat role per stored token (optional), ``templated`` whether the chat
    template rendered each prompt (optional), ``responses`` (a ``capture --generate`` store) the per-prompt
    lists ``response_start``, ``stop_reason`` and ``response_text``.
    """
    n_pass, n_prompts = len(passes), len(texts)
    layers = list(layers) if layers is not None else list(range(n_layers1))
    n_tokens = max(len(ids) for ids in token_ids)
    stored = [len(ids) for ids in token_ids]
    ids_pt = np.full((n_prompts, n_tokens), -1, dtype=np.int32)
    pieces_pt = np.full((n_prompts, n_tokens), "", dtype=object)
    positions_pt = np.full((n_prompts, n_tokens), -1, dtype=np.int32)
    for row, (ids, pieces) in enumerate(zip(token_ids, token_pieces, strict=True)):
        ids_pt[row, : len(ids)] = ids
        pieces_pt[row, : len(pieces)] = pieces
        positions_pt[row, : len(ids)] = token_positions[row] if token_positions else np.arange(len(ids))
    cp, cl, ct = chunking.prompt, chunking.layer, chunking.token or n_tokens
    resid = da.full((n_pass, n_prompts, len(layers), n_tokens, hidden), np.nan, dtype=store_dtype,
                    chunks=(1, cp, cl, ct, hidden))
    final = da.full((n_pass, n_prompts, n_tokens, hidden), np.nan, dtype=store_dtype,
                    chunks=(1, cp, ct, hidden))
    done = da.zeros((n_pass, n_prompts), dtype=bool, chunks=(1, chunking.shard or cp))
    coords = {
        "pass_": ("pass_", string_array([p["name"] for p in passes])),
        "model": ("pass_", string_array([p["llm"] for p in passes])),
        "embedding": ("pass_", string_array([p["embedding"] for p in passes])),
        "unembedding": ("pass_", string_array([p["unembedding"] for p in passes])),
        "prompt": ("prompt", np.asarray(prompt_labels if prompt_labels is not None else range(n_prompts),
                                        dtype=np.int64)),
        "prompt_text": ("prompt", string_array(texts)),
        "prompt_index": ("prompt", np.asarray(prompt_index or range(n_prompts), dtype=np.int64)),
        "variant": ("prompt", string_array(variants or ["identity"] * n_prompts)),
        "n_tokens": ("prompt", np.array(stored, dtype=np.int32)),
        "prompt_length": ("prompt", np.array(prompt_lengths or stored, dtype=np.int32)),
        "layer": ("layer", np.asarray(layers, dtype=np.int64)),
        "token": ("token", np.arange(n_tokens, dtype=np.int64)),
        "token_id": (("prompt", "token"), ids_pt),
        "token_str": (("prompt", "token"), pieces_pt),
        "token_position": (("prompt", "token"), positions_pt),
    }
    if roles is not None:
        roles_pt = np.full((n_prompts, n_tokens), "", dtype=object)
        for row, kinds in enumerate(roles):
            roles_pt[row, : len(kinds)] = kinds
        coords["role"] = (("prompt", "token"), roles_pt)
    if any("split" in p for p in passes):  # crossed passes: every pass's recipe (docs/store-format.md)
        coords["lower_body"] = ("pass_", string_array([p.get("lower") or p["llm"] for p in passes]))
        coords["upper_body"] = ("pass_", string_array([p["llm"] for p in passes]))
        coords["split_layer"] = ("pass_", np.asarray([p.get("split") or 0 for p in passes], dtype=np.int32))
    if responses is not None:
        coords["response_start"] = ("prompt", np.asarray(responses["response_start"], dtype=np.int32))
        coords["stop_reason"] = ("prompt", string_array(responses["stop_reason"]))
        coords["response_text"] = ("prompt", string_array(responses["response_text"]))
    coords = {name: _as_is(*value) if value[1].dtype == object else value for name, value in coords.items()}
    if templated is not None:
        coords["chat_templated"] = ("prompt", np.asarray(templated, dtype=bool))
    return xr.Dataset(
        {
            "resid": (DIMS, resid, {"long_name": "residual stream", "layer_semantics": LAYER_SEMANTICS}),
            "final": (("pass_", "prompt", "token", "dim"), final, {"long_name": "final-norm output"}),
            "done": (("pass_", "prompt"), done, {"long_name": "region fully written"}),
        },
        coords=coords,
        attrs={FORMAT_ATTR: FORMAT_VERSION, **attrs},
    )


def compressors(codec: str) -> list:
    """The Zarr bytes-to-bytes codecs of a codec name of :data:`CODECS`: its compressor, then a crc32c
    checksum of the compressed bytes (format 3), which zarr, tensorstore and resdiff's direct reader verify."""
    if codec == "zstd":
        return [zarr.codecs.ZstdCodec(level=1), zarr.codecs.Crc32cCodec()]
    if codec == "lz4":  # no shuffle: it does not help activations (BENCHMARKS.md, "Codecs")
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), zarr.codecs.Crc32cCodec()]
    if codec == "none":
        return [zarr.codecs.Crc32cCodec()]
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


# Written one pass at a time (the residual stage holds one model), so a shard of theirs holds one pass.
PER_PASS = ("resid", "final")


def shard_shapes(ds: xr.Dataset, chunks: dict[str, tuple[int, ...]], shard_prompts: int) -> dict[str, tuple]:
    """Zarr shard shapes (format 4) of the per-position arrays (those with ``prompt`` and ``token``): a shard
    holds ``shard_prompts`` prompts (one write group) and every inner chunk of theirs along the other axes
    (one pass of :data:`PER_PASS` arrays), so that a group's write makes whole shards, each written once."""
    out = {}
    for name, var in ds.data_vars.items():
        if name not in chunks or "prompt" not in var.dims or "token" not in var.dims or 0 in var.shape:
            continue  # (an empty array, the pairs of a one-pass capture, has nothing to shard)
        shape = []
        for dim, size, chunk in zip(var.dims, var.shape, chunks[name], strict=True):
            if dim == "prompt":
                shape.append(shard_prompts)
            elif dim == "pass_" and name in PER_PASS:
                shape.append(chunk)
            else:
                shape.append(-(-size // chunk) * chunk)
        out[name] = tuple(shape)
    return out


LABEL_CHUNK_CELLS = 2**24  # values per chunk of a per-prompt label array (token ids, strings, positions)


def _label_chunks(var: xr.Variable) -> tuple[int, ...]:
    """Chunks of a per-prompt label array written whole with the template: whole rows of prompts, as many as
    :data:`LABEL_CHUNK_CELLS` allows (zarr's default cut 20,000 short prompts' token ids into dozens of files)."""
    axis = var.dims.index("prompt")
    row = int(np.prod([n for d, n in zip(var.dims, var.shape, strict=True) if d != "prompt"], dtype=np.int64))
    prompts = max(1, min(var.shape[axis], LABEL_CHUNK_CELLS // max(1, row)))
    return tuple(prompts if d == "prompt" else max(1, n) for d, n in zip(var.dims, var.shape, strict=True))


def encoding(ds: xr.Dataset, codec: str = DEFAULT_CODEC, chunks: dict | None = None,
             shards: dict | None = None) -> dict[str, dict]:
    """Per-variable Zarr encoding: ``codec`` for the data arrays, zstd for the small ones, a checksum for every
    array (coordinates included); ids of chunks never written (padding only) read as -1, like the padding
    inside written chunks. ``chunks`` gives Zarr chunks where they differ from the variables' Dask chunks,
    ``shards`` Zarr shard shapes (:func:`shard_shapes`); the checksum then covers each inner chunk and each
    shard's index."""
    out = {}
    for name, var in ds.variables.items():
        if var.ndim >= 3:
            out[name] = {"compressors": compressors(codec), **({"fill_value": -1} if var.dtype.kind == "i" else {})}
        else:
            out[name] = {"compressors": compressors("zstd")}
        if chunks and name in chunks:
            out[name]["chunks"] = chunks[name]
        elif var.chunks is None and "prompt" in var.dims and var.ndim:  # per-prompt labels: few, large chunks
            out[name]["chunks"] = _label_chunks(var)
        if shards and name in shards:
            out[name]["shards"] = shards[name]
    return out


LENS_NAMES = ("raw", "norm")
NORM_KINDS = ("layernorm", "rmsnorm", "rmsnorm_unit_offset")


def norm_formula(kind: str, h, weight, bias, eps: float, mean):
    """The final norm as a formula over any array type (torch, numpy, xarray).

    ``mean(x)`` must average over the hidden dimension and keep it broadcastable.
    ``rmsnorm_unit_offset`` is the Gemma form, which scales by ``1 + weight``.
    """
    if kind == "layernorm":
        centered = h - mean(h)
        return centered / (mean(centered * centered) + eps) ** 0.5 * weight + bias
    scale = weight + 1 if kind == "rmsnorm_unit_offset" else weight
    return h / (mean(h * h) + eps) ** 0.5 * scale


@dataclass(frozen=True)
class LensHead:
    """What a model's unembedding does around its product, once for capture and analysis: the final norm
    (:func:`norm_formula` of ``norm_kind`` with ``norm_eps``), then ``z * logit_multiplier`` and, with a
    ``logit_softcap``, ``cap * tanh(z / cap)``. Recorded per unembedding source in a store's ``lens_heads``
    attribute (and ``saved_lens``, with the same keys), as the capture found it numerically on the loaded model.

    >>> head = LensHead.from_attrs({"norm_kind": "rmsnorm", "norm_eps": 1e-6, "logit_multiplier": 1.0,
    ...                             "logit_softcap": 30.0})
    >>> round(float(head.after_product(np.array([60.0]), np.tanh)[0]), 2), head.attrs()["norm_kind"]
    (28.92, 'rmsnorm')
    """

    norm_kind: str
    norm_eps: float
    logit_multiplier: float = 1.0
    logit_softcap: float | None = None

    def attrs(self) -> dict:
        return {"norm_kind": self.norm_kind, "norm_eps": self.norm_eps, "logit_multiplier": self.logit_multiplier,
                "logit_softcap": self.logit_softcap}

    @classmethod
    def from_attrs(cls, record: dict, where: str = "the store") -> LensHead:
        if record.get("norm_kind") not in NORM_KINDS:
            raise StoreFormatError(path=where, detail=f"a recorded lens head has norm_kind "
                                   f"{record.get('norm_kind')!r}, not one of {', '.join(NORM_KINDS)}")
        return cls(record["norm_kind"], float(record["norm_eps"]), float(record.get("logit_multiplier") or 1.0),
                   record.get("logit_softcap"))

    def after_product(self, z, tanh):
        """The head after ``normed h @ W^T + b``, over any array type (``tanh`` its tanh)."""
        z = z * self.logit_multiplier
        return self.logit_softcap * tanh(z / self.logit_softcap) if self.logit_softcap else z


@dataclass(frozen=True)
class Statistic:
    """One logit-lens statistic: the one table the template, the capture's memory plan and its kernels follow.

    ``lead`` is ``pass_`` (one value per pass) or ``pair`` (per pass pair); ``tail`` an extra axis (``k``: the
    top-k, ``tracked``: the tracked tokens) or None; every statistic is per (lens, prompt, layer, token).
    """

    name: str
    lead: str
    tail: str | None
    dtype: str
    long_name: str
    units: str | None = None

    def values_per_position(self, n_pass: int, n_pair: int, top_k: int, n_tracked: int) -> int:
        """Values at one (prompt, layer, token) position, both lenses."""
        tail = {None: 1, "k": top_k, "tracked": n_tracked}[self.tail]
        return len(LENS_NAMES) * (n_pass if self.lead == "pass_" else n_pair) * tail


STATISTICS = (
    Statistic("entropy", "pass_", None, "float32", "entropy of the lens distribution", "nats"),
    Statistic("lse", "pass_", None, "float32", "log-sum-exp of the lens logits (log partition)", "nats"),
    Statistic("topk_id", "pass_", "k", "int32", "ids of the k largest lens logits, largest first"),
    Statistic("topk_logit", "pass_", "k", "float32", "the k largest lens logits, largest first"),
    Statistic("kl", "pair", None, "float32", "KL(right || left) of the lens distributions", "nats"),
    Statistic("rise_id", "pair", "k", "int32", "ids of the k tokens whose logit rose most from left to right"),
    Statistic("rise_shift", "pair", "k", "float32", "logit shift right - left of rise_id (positive, largest first)"),
    Statistic("fall_id", "pair", "k", "int32", "ids of the k tokens whose logit fell most from left to right"),
    Statistic("fall_shift", "pair", "k", "float32",
              "logit shift right - left of fall_id (negative, most negative first)"),
    Statistic("tracked_logit", "pass_", "tracked", "float32", "lens logit of each tracked token"),
    Statistic("target_logprob", "pass_", None, "float32",
              "log-probability the lens gives the token that follows (teacher forcing); NaN where that token is not "
              "stored (a prompt's last stored position)", "nats"),
)  # (in the template's variable order; target_logprob is new in stores made after 2026-12-07, optional to readers)
PASS_STATS = tuple(s.name for s in STATISTICS if s.lead == "pass_")
PAIR_STATS = tuple(s.name for s in STATISTICS if s.lead == "pair")


def statistics_bytes_per_position(n_pass: int, n_pair: int, top_k: int, n_tracked: int) -> int:
    """Bytes of every :data:`STATISTICS` at one (prompt, layer, token) position, both lenses.

    >>> statistics_bytes_per_position(4, 6, 20, 0) == 2 * (4 * (3 + 2 * 20) + 6 * (1 + 4 * 20)) * 4
    True
    """
    return sum(s.values_per_position(n_pass, n_pair, top_k, n_tracked) * np.dtype(s.dtype).itemsize
               for s in STATISTICS)


def add_lens_variables(
    ds: xr.Dataset, *, pairs: list[tuple[str, str, str]], top_k: int, tracked_ids: list[int],
    tracked_strs: list[str], chunk_prompt: int, chunk_token: int | None = None,
    lens_layers: list[int] | None = None, flag_chunk: int | None = None,
) -> xr.Dataset:
    """Add the (lazily empty) logit-lens statistics to a template.

    ``pairs`` are (name, left pass, right pass). Integer ids of unwritten regions read
    as 0: trust them only where ``lens_done`` is set. ``lens_layers`` (true layer numbers,
    default all) are the layers whose statistics are computed: the ``lens_layer`` coordinate.
    ``flag_chunk``: prompts per chunk of ``lens_done`` (a write group: the shard rows of format 4).
    """
    n_pass, n_prompts = ds.sizes["pass_"], ds.sizes["prompt"]
    n_layers1, n_tokens = ds.sizes["layer"], ds.sizes["token"]
    n_lens, n_pair = len(LENS_NAMES), len(pairs)
    position = ("prompt", "layer", "token")
    extra = {"k": top_k, "tracked": len(tracked_ids)}

    def empty(lead: str, n_lead: int, tail: str | None, dtype: str):
        shape = (n_lead, n_lens, n_prompts, n_layers1, n_tokens) + ((extra[tail],) if tail else ())
        chunks = (1, 1, chunk_prompt, n_layers1, chunk_token or n_tokens) + ((extra[tail],) if tail else ())
        fill = np.nan if dtype == "float32" else -1
        dims = (lead, "lens", *position) + ((tail,) if tail else ())
        return dims, da.full(shape, fill, dtype=dtype, chunks=chunks)

    data = {}
    for stat in STATISTICS:
        if stat.tail == "tracked" and not tracked_ids:
            continue
        dims, array = empty(stat.lead, n_pass if stat.lead == "pass_" else n_pair, stat.tail, stat.dtype)
        data[stat.name] = (dims, array, {"long_name": stat.long_name} | ({"units": stat.units} if stat.units else {}))
    data["lens_done"] = (("prompt",), da.zeros(n_prompts, dtype=bool, chunks=flag_chunk or chunk_prompt),
                         {"long_name": "lens statistics of this prompt fully written"})
    stored = [int(la) for la in ds.layer.values]
    chosen = set(stored if lens_layers is None else lens_layers)
    coords = {
        "lens_layer": ("layer", np.array([la in chosen for la in stored], dtype=bool)),
        "lens": ("lens", string_array(LENS_NAMES)),
        "pair": ("pair", string_array([p[0] for p in pairs])),
        "left": ("pair", string_array([p[1] for p in pairs])),
        "right": ("pair", string_array([p[2] for p in pairs])),
        "k": ("k", np.arange(top_k, dtype=np.int64)),
        "tracked_id": ("tracked", np.asarray(tracked_ids, dtype=np.int64)),
        "tracked_str": ("tracked", string_array(tracked_strs)),
    }
    return ds.assign_coords(coords).assign(data)


def lens_layers(ds: xr.Dataset) -> list[int]:
    """The layers (true numbers) whose lens statistics a store holds: ``lens_layer`` where a capture chose
    some (``--lens-layers``), every stored layer otherwise (stores before the coordinate).

    >>> import numpy as np
    >>> ds = xr.Dataset(coords={"layer": [0, 4, 8], "lens_layer": ("layer", np.array([False, True, True]))})
    >>> lens_layers(ds)
    [4, 8]
    """
    labels = [int(la) for la in ds.layer.values]
    if "lens_layer" not in ds.coords:
        return labels
    return [la for la, kept in zip(labels, np.asarray(ds.lens_layer.values, dtype=bool), strict=True) if kept]


def add_saved_lens_variables(ds: xr.Dataset, *, sources: list[str], vocab: int, hidden: int) -> xr.Dataset:
    """Room for each unembedding's parameters (``--save-lens``), so that lens statistics of
    other tokens can be computed later from the store alone. Float32 keeps bf16 weights exact."""
    rows = max(1, min(vocab, TARGET_CHUNK_BYTES // (hidden * 4)))
    n_src = len(sources)
    data = {
        "lens_weight": (("source", "vocab", "dim"),
                        da.zeros((n_src, vocab, hidden), dtype="float32", chunks=(1, rows, hidden)),
                        {"long_name": "unembedding (lm_head) weight"}),
        "lens_bias": (("source", "vocab"), da.zeros((n_src, vocab), dtype="float32", chunks=(1, vocab)),
                      {"long_name": "lm_head bias (zero where the model has none)"}),
        "lens_norm_weight": (("source", "dim"), da.zeros((n_src, hidden), dtype="float32", chunks=(1, hidden)),
                             {"long_name": "final norm weight"}),
        "lens_norm_bias": (("source", "dim"), da.zeros((n_src, hidden), dtype="float32", chunks=(1, hidden)),
                           {"long_name": "final norm bias (zero where the norm has none)"}),
    }
    return ds.assign_coords(source=("source", string_array(sources))).assign(data)
