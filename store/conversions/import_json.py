"""``import-json``: a legacy JSON file (format 1 or 2) as a statistics-only store.

Users can leave their multi-GB JSON files: the file is read twice, streaming (once to
learn the shapes, once to fill the store one record at a time), and never held in
memory whole. The store has no ``resid``; it holds what the JSON held, labelled:

- legacy layer key ``k`` becomes layer ``k + 1`` (our layer 0 is the embedding output,
  which the legacy files never reported); the last key is the legacy post-norm state;
- lens statistics get ``lens = ["raw"]`` (the legacy semantics);
- geometric fields the legacy files stored (norms, cosines, deltas) become variables
  ``norm``, ``norm_delta``, ``cosine_prev`` per pass and ``cosine_sim``, ``norm_diff``
  per pair, since they cannot be derived without ``resid``.

Format 1 (one pass pair per embedding variant) maps each embedding variant ``v`` to
passes ``v.base`` and ``v.sft`` and a pair ``v``; it has no per-pass top-k.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr

from store.atomic import atomic_output
from store.errors import UsageError
from store.lock import store_lock
from store.schema import FORMAT_ATTR, FORMAT_VERSION, string_array
from store.target import WriteMode, claim
from store.writer import StoreWriter

READ_BYTES = 1 << 22


def iter_json_array(path: str | Path) -> Iterator[dict]:
    """Yield the elements of a top-level JSON array one at a time, reading the file in pieces."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as fh:
        buf, pos, started = "", 0, False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and not started:
                if buf[pos] != "[":
                    raise UsageError(f"{path} is not a legacy results file: it must be a JSON array of records")
                started, pos = True, pos + 1
                continue
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("need more", buf, pos)
                record, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                more = fh.read(max(READ_BYTES, len(buf) - pos))
                if not more:
                    raise UsageError(f"{path} ends in the middle of a record; the file is truncated") from None
                buf, pos = buf[pos:] + more, 0
                continue
            if not isinstance(record, dict):
                raise UsageError(f"{path}: records must be JSON objects")
            yield record


def _sides(record: dict) -> tuple[list[dict], list[dict]]:
    """(passes, pairs) of a record: dicts with name/model/embedding/unembedding, and name/left/right/layers."""
    if record.get("format_version") == 2:
        passes = [{"name": r["name"], "model": r["model"], "embedding": r["embedding_source"],
                   "unembedding": r["unembedding_source"], "layers": r["layers"]} for r in record["runs"]]
        pairs = [{"name": p["name"], "left": p["base_run"], "right": p["sft_run"], "layers": p["layers"]}
                 for p in record["pairwise"]]
        return passes, pairs
    variant = record["metadata"]["embedding_variant"]
    swap = record["swap_options"]
    passes = [{"name": f"{variant}.{side}", "model": side, "embedding": swap[side]["embedding_source"],
               "unembedding": swap[side]["unembedding_source"], "layers": None} for side in ("base", "sft")]
    return passes, [{"name": variant, "left": f"{variant}.base", "right": f"{variant}.sft",
                     "layers": record["layers"]}]


class _Shape:
    """What the first streaming read learns: labels and sizes."""

    def __init__(self) -> None:
        self.prompts: dict[tuple, dict] = {}
        self.passes: dict[str, dict] = {}
        self.pairs: dict[str, dict] = {}
        self.n_keys = self.n_tokens = self.k_pass = self.k_pair = 0
        self.tracked: set[int] = set()
        self.format = None

    def add(self, record: dict) -> None:
        version = 2 if record.get("format_version") == 2 else 1
        if self.format not in (None, version):
            raise UsageError("the file mixes format 1 and format 2 records; import them separately")
        self.format = version
        meta = record["metadata"]
        key = (meta.get("prompt_idx"), meta.get("variant_name"))
        self.prompts.setdefault(key, {"text": record["prompt"], "tokens": record["tokens"]})
        self.n_tokens = max(self.n_tokens, len(record["tokens"]))
        passes, pairs = _sides(record)
        for p in passes:
            self.passes.setdefault(p["name"], {k: p[k] for k in ("model", "embedding", "unembedding")})
            if p["layers"]:
                self.n_keys = max(self.n_keys, len(p["layers"]))
                first = next(iter(next(iter(p["layers"].values())).values()), {})
                self.k_pass = max(self.k_pass, len(first.get("top_k_logits", {}).get("indices", [])))
                self.tracked |= {int(t) for t in first.get("tracked_token_logits", {})}
        for q in pairs:
            self.pairs.setdefault(q["name"], {"left": q["left"], "right": q["right"]})
            self.n_keys = max(self.n_keys, len(q["layers"]))
            first = next(iter(next(iter(q["layers"].values())).values()), {})
            self.k_pair = max(self.k_pair, len(first.get("top_k_increased", {}).get("indices", [])))
            self.tracked |= {int(t) for t in first.get("tracked_token_logits", {})}


def _full(shape, dtype, chunks):
    fill = np.nan if np.dtype(dtype).kind == "f" else (-1 if np.dtype(dtype).kind == "i" else False)
    return da.full(shape, fill, dtype=dtype, chunks=chunks)


def _template(shape: _Shape, source: Path) -> xr.Dataset:
    n_pass, n_pair, n_prompt = len(shape.passes), len(shape.pairs), len(shape.prompts)
    n_keys, n_tok, k, n_tracked = shape.n_keys, shape.n_tokens, shape.k_pair, len(shape.tracked)
    pos = ("prompt", "layer", "token")
    base = (n_prompt, n_keys, n_tok)
    chunk = (1, n_keys, n_tok)
    data = {
        "done": (("pass_", "prompt"), _full((n_pass, n_prompt), bool, (1, 1))),
        "lens_done": (("prompt",), _full((n_prompt,), bool, (1,))),
        "entropy": (("pass_", "lens", *pos), _full((n_pass, 1, *base), "float32", (1, 1, *chunk))),
        "norm": (("pass_", *pos), _full((n_pass, *base), "float32", (1, *chunk))),
        "norm_delta": (("pass_", *pos), _full((n_pass, *base), "float32", (1, *chunk))),
        "cosine_prev": (("pass_", *pos), _full((n_pass, *base), "float32", (1, *chunk))),
        "kl": (("pair", "lens", *pos), _full((n_pair, 1, *base), "float32", (1, 1, *chunk))),
        "cosine_sim": (("pair", *pos), _full((n_pair, *base), "float32", (1, *chunk))),
        "norm_diff": (("pair", *pos), _full((n_pair, *base), "float32", (1, *chunk))),
    }
    for name, dtype in (("rise_id", "int32"), ("rise_shift", "float32"), ("fall_id", "int32"),
                        ("fall_shift", "float32")):
        data[name] = (("pair", "lens", *pos, "k"), _full((n_pair, 1, *base, k), dtype, (1, 1, *chunk, k)))
    if shape.k_pass:
        for name, dtype in (("topk_id", "int32"), ("topk_logit", "float32")):
            data[name] = (("pass_", "lens", *pos, "k"),
                          _full((n_pass, 1, *base, shape.k_pass), dtype, (1, 1, *chunk, shape.k_pass)))
    if n_tracked:
        data["tracked_logit"] = (("pass_", "lens", *pos, "tracked"),
                                 _full((n_pass, 1, *base, n_tracked), "float32", (1, 1, *chunk, n_tracked)))
    tokens = np.full((n_prompt, n_tok), "", dtype=object)
    for i, prompt in enumerate(shape.prompts.values()):
        tokens[i, : len(prompt["tokens"])] = prompt["tokens"]
    passes, pairs = shape.passes, shape.pairs
    coords = {
        "pass_": string_array(passes), "model": ("pass_", string_array(p["model"] for p in passes.values())),
        "embedding": ("pass_", string_array(p["embedding"] for p in passes.values())),
        "unembedding": ("pass_", string_array(p["unembedding"] for p in passes.values())),
        "pair": string_array(pairs), "left": ("pair", string_array(q["left"] for q in pairs.values())),
        "right": ("pair", string_array(q["right"] for q in pairs.values())),
        "lens": string_array(["raw"]), "prompt": np.arange(n_prompt),
        "prompt_text": ("prompt", string_array(p["text"] for p in shape.prompts.values())),
        "prompt_index": ("prompt", np.array([key[0] if key[0] is not None else -1 for key in shape.prompts])),
        "variant": ("prompt", string_array(str(key[1]) for key in shape.prompts)),
        "n_tokens": ("prompt", np.array([len(p["tokens"]) for p in shape.prompts.values()], dtype=np.int32)),
        "layer": np.arange(1, n_keys + 1), "token": np.arange(n_tok), "k": np.arange(k),
        "token_str": (("prompt", "token"), tokens),
        "tracked_id": ("tracked", np.array(sorted(shape.tracked), dtype=np.int64)),
        "tracked_str": ("tracked", string_array(str(t) for t in sorted(shape.tracked))),
    }
    attrs = {
        FORMAT_ATTR: FORMAT_VERSION, "statistics_only": True, "imported_from": str(source),
        "legacy_format": shape.format, "pair_label": source.stem,
        "layer_semantics": "imported legacy file: layer l is legacy key l-1 (hidden_states[l]); the last layer is "
                           "the legacy post-final-norm state; there is no resid and no layer 0",
    }
    return xr.Dataset({k: (*v, {}) for k, v in data.items()}, coords=coords, attrs=attrs)


def _grid(layers: dict, field, n_keys: int, n_tok: int, tail: int | None = None, dtype=np.float32) -> np.ndarray:
    """One field of a legacy ``layers`` mapping as an (L, T[, tail]) array (missing positions stay empty)."""
    fill = -1 if np.dtype(dtype).kind == "i" else np.nan
    out = np.full((n_keys, n_tok) + ((tail,) if tail else ()), fill, dtype=dtype)
    for key, positions in layers.items():
        for t, stats in positions.items():
            value = field(stats)
            if tail:
                value = (list(value) + [fill] * tail)[:tail]
            out[int(key), int(t)] = value
    return out


def _fill(root, record: dict, shape: _Shape, prompt: int) -> None:
    n_keys, n_tok = shape.n_keys, shape.n_tokens
    pass_at = {name: i for i, name in enumerate(shape.passes)}
    tracked = [str(t) for t in sorted(shape.tracked)]
    passes, pairs = _sides(record)

    def put(name: str, lead: int, values: np.ndarray, with_lens: bool = True) -> None:
        if name in root:
            root[name][(lead, 0, prompt) if with_lens else (lead, prompt)] = values

    for p in passes:
        if p["layers"] is None:
            continue
        i, layers = pass_at[p["name"]], p["layers"]
        put("entropy", i, _grid(layers, lambda s: s["entropy"], n_keys, n_tok))
        for name in ("norm", "norm_delta", "cosine_prev"):
            put(name, i, _grid(layers, lambda s, n=name: s.get(n, np.nan), n_keys, n_tok), with_lens=False)
        if shape.k_pass:
            put("topk_id", i, _grid(layers, lambda s: s["top_k_logits"]["indices"], n_keys, n_tok, shape.k_pass,
                                    np.int32))
            put("topk_logit", i, _grid(layers, lambda s: s["top_k_logits"]["values"], n_keys, n_tok, shape.k_pass))
        if tracked:
            put("tracked_logit", i, _grid(layers, lambda s: [s["tracked_token_logits"].get(t, np.nan)
                                                               for t in tracked], n_keys, n_tok, len(tracked)))
        root["done"][i, prompt] = True
    for q in pairs:
        j, layers = list(shape.pairs).index(q["name"]), q["layers"]
        k = shape.k_pair
        put("kl", j, _grid(layers, lambda s: s["kl_div"], n_keys, n_tok))
        put("rise_id", j, _grid(layers, lambda s: s["top_k_increased"]["indices"], n_keys, n_tok, k, np.int32))
        put("rise_shift", j, _grid(layers, lambda s: s["top_k_increased"]["values"], n_keys, n_tok, k))
        put("fall_id", j, _grid(layers, lambda s: s["top_k_decreased"]["indices"], n_keys, n_tok, k, np.int32))
        put("fall_shift", j, _grid(layers, lambda s: s["top_k_decreased"]["values"], n_keys, n_tok, k))
        put("cosine_sim", j, _grid(layers, lambda s: s["cosine_sim"], n_keys, n_tok), with_lens=False)
        put("norm_diff", j, _grid(layers, lambda s: s["norm_diff"], n_keys, n_tok), with_lens=False)
        if shape.format == 1:  # format 1 keeps the per-side statistics in the pair record
            for side in ("base", "sft"):
                i = pass_at[q["left"] if side == "base" else q["right"]]
                put("entropy", i, _grid(layers, lambda s, x=side: s[f"entropy_{x}"], n_keys, n_tok))
                put("norm", i, _grid(layers, lambda s, x=side: s[f"norm_{x}"], n_keys, n_tok), with_lens=False)
                for name in ("cosine_prev", "norm_delta"):
                    put(name, i, _grid(layers, lambda s, x=side, n=name: s.get(f"{x}_{n}", np.nan), n_keys, n_tok),
                        with_lens=False)
                if tracked:
                    put("tracked_logit", i, _grid(
                        layers, lambda s, x=side: [s["tracked_token_logits"].get(t, {}).get(x, np.nan)
                                                   for t in tracked], n_keys, n_tok, len(tracked)))
                root["done"][i, prompt] = True
    root["lens_done"][prompt] = True


def import_json(source: str | Path, store: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert a legacy JSON file into a statistics-only store (default: next to it, ``.zarr``)."""
    source = Path(source)
    if not source.is_file():
        raise UsageError(f"{source} does not exist or is not a file; give the path of a legacy JSON file")
    path = Path(store) if store else source.with_suffix(".zarr")
    mode = WriteMode.OVERWRITE if overwrite else WriteMode.CREATE
    claim(path, mode)  # refused before the file is read twice; claimed again under the lock below
    shape = _Shape()
    try:
        for record in iter_json_array(source):
            shape.add(record)
    except (KeyError, TypeError, StopIteration) as exc:
        raise UsageError(f"{source} is not a legacy results file: a record lacks {exc}") from None
    if not shape.prompts:
        raise UsageError(f"{source} holds no records; nothing to import")
    with store_lock(path), atomic_output(path, unique=True) as partial:
        claim(path, mode)  # "replace": the new store is renamed over the old one when complete
        writer = StoreWriter.create(partial, _template(shape, source))
        prompt_at = {key: i for i, key in enumerate(shape.prompts)}
        for record in iter_json_array(source):
            meta = record["metadata"]
            _fill(writer.group, record, shape, prompt_at[(meta.get("prompt_idx"), meta.get("variant_name"))])
        writer.finalize({"completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
    return path
