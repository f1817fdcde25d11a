"""``export-json``: the legacy format-2 (multi-pass) JSON as a derived view of a store.

Written streaming, one prompt's records in memory at a time, byte-for-byte what the
legacy tool's ``json.dump(records, indent=2)`` layout gives. Layer key ``k`` is the
legacy ``hidden_states[k + 1]``: our ``resid`` layer ``k + 1`` for k < L - 1 and the
post-norm ``final`` for the last key. With the legacy ``raw`` lens (default), the
statistics of the last key are those of the unembedding applied to ``final``, which
is our ``norm`` lens at layer L. ``lens="norm"`` exports the standard logit lens at
every key instead (a documented deviation from the legacy numbers).

Geometric fields (norms, cosines, deltas) are computed here in float64 from the
stored states; the legacy tool computed them in the model dtype.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xarray as xr

from store.atomic import atomic_output
from store.errors import StoreFormatError, UsageError
from store.location import sanitize_label
from store.reader import open_store

EPS = 1e-8
META_NOTE = "Multi-pass residual comparison exported by resdiff from a Zarr store (derived view)."
MANIFEST_HEADER = "timestamp,entry,prompt_count,prompt_variants,multi_pass,json_path,log_path"


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis, with the legacy eps on the norm product."""
    dot = (a * b).sum(-1)
    return dot / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), EPS)


def _states(ds: xr.Dataset, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """(current, previous) states per pass for the legacy keys: (pass, L, T, d) float64 each."""
    n_tok = int(ds.n_tokens.values[prompt])
    real = {"prompt": prompt, "token": slice(0, n_tok)}  # only this prompt's stored chunks are read
    resid = ds.resid.isel(real).values.astype(np.float64)
    final = ds.final.isel(real).values.astype(np.float64)
    current = np.concatenate([resid[:, 1:-1], final[:, None]], axis=1)
    return current, resid[:, :-1]


def _lens_at_keys(var: xr.DataArray, prompt: int, lens: str, n_tok: int) -> np.ndarray:
    """A lens statistic at the legacy keys: (pass or pair, L, T[, k])."""
    values = var.isel(prompt=prompt, token=slice(0, n_tok))
    if lens == "norm":
        return values.sel(lens="norm").values[:, 1:]
    raw, normed = values.sel(lens="raw").values, values.sel(lens="norm").values
    return np.concatenate([raw[:, 1:-1], normed[:, -1:]], axis=1)


def _topk(ids: np.ndarray, values: np.ndarray) -> dict:
    return {"indices": [int(i) for i in ids], "values": [round(float(v), 6) for v in values]}


def prompt_records(ds: xr.Dataset, prompt: int, lens: str = "raw") -> dict:
    """The format-2 record of the prompt in store row ``prompt``."""
    n_tok = int(ds.n_tokens.values[prompt])
    tokens = [str(t) for t in ds.token_str.isel(prompt=prompt, token=slice(0, n_tok)).values]
    passes = [str(p) for p in ds.pass_.values]
    index = {p: i for i, p in enumerate(passes)}
    meta = {"prompt_idx": int(ds.prompt_index.values[prompt]), "variant_name": str(ds.variant.values[prompt]),
            "embedding_variant": "multi_pass"}
    current, previous = _states(ds, prompt)
    norm, norm_prev = np.linalg.norm(current, axis=-1), np.linalg.norm(previous, axis=-1)
    cos_prev = _cos(current, previous)
    stat = {name: _lens_at_keys(ds[name], prompt, lens, n_tok)
            for name in ("entropy", "topk_id", "topk_logit", "kl", "rise_id", "rise_shift", "fall_id", "fall_shift",
                         "tracked_logit") if name in ds}
    tracked = [str(int(t)) for t in ds.tracked_id.values] if "tracked_logit" in stat else []
    n_keys = current.shape[1]
    runs = []
    for p, name in enumerate(passes):
        layers = {}
        for k in range(n_keys):
            layers[str(k)] = {
                str(t): {
                    "token": tokens[t],
                    "entropy": float(stat["entropy"][p, k, t]),
                    "norm": float(norm[p, k, t]),
                    "norm_delta": float(norm[p, k, t] - norm_prev[p, k, t]),
                    "cosine_prev": float(cos_prev[p, k, t]),
                    "top_k_logits": _topk(stat["topk_id"][p, k, t], stat["topk_logit"][p, k, t]),
                    "tracked_token_logits": {
                        tid: float(stat["tracked_logit"][p, k, t, j]) for j, tid in enumerate(tracked)},
                }
                for t in range(n_tok)
            }
        runs.append({"name": name, "model": str(ds.model.values[p]), "embedding_source": str(ds.embedding.values[p]),
                     "unembedding_source": str(ds.unembedding.values[p]), "layers": layers,
                     "metadata": {**meta, "run_name": name}})
    pairwise = []
    for q, pair in enumerate(str(x) for x in ds.pair.values):
        left, right = index[str(ds.left.values[q])], index[str(ds.right.values[q])]
        cos = _cos(current[left], current[right])
        diff = np.linalg.norm(current[left] - current[right], axis=-1)
        layers = {}
        for k in range(n_keys):
            layers[str(k)] = {
                str(t): {
                    "token": tokens[t],
                    "top_k_increased": _topk(stat["rise_id"][q, k, t], stat["rise_shift"][q, k, t]),
                    "top_k_decreased": _topk(stat["fall_id"][q, k, t], stat["fall_shift"][q, k, t]),
                    "entropy_base": float(stat["entropy"][left, k, t]),
                    "entropy_sft": float(stat["entropy"][right, k, t]),
                    "kl_div": float(stat["kl"][q, k, t]),
                    "tracked_token_logits": {
                        tid: {"base": float(stat["tracked_logit"][left, k, t, j]),
                              "sft": float(stat["tracked_logit"][right, k, t, j])} for j, tid in enumerate(tracked)},
                    "cosine_sim": float(cos[k, t]),
                    "norm_base": float(norm[left, k, t]),
                    "norm_sft": float(norm[right, k, t]),
                    "norm_diff": float(diff[k, t]),
                    "base_cosine_prev": float(cos_prev[left, k, t]),
                    "base_norm_delta": float(norm[left, k, t] - norm_prev[left, k, t]),
                    "sft_cosine_prev": float(cos_prev[right, k, t]),
                    "sft_norm_delta": float(norm[right, k, t] - norm_prev[right, k, t]),
                }
                for t in range(n_tok)
            }
        l_name, r_name = passes[left], passes[right]
        pairwise.append({
            "name": pair, "base_run": l_name, "sft_run": r_name, "prompt": str(ds.prompt_text.values[prompt]),
            "tokens": tokens, "metadata": {**meta, "base_run": l_name, "sft_run": r_name, "pair_name": pair},
            "swap_options": {side: {"embedding_source": str(ds.embedding.values[i]),
                                    "unembedding_source": str(ds.unembedding.values[i])}
                             for side, i in (("base", left), ("sft", right))},
            "layers": layers,
        })
    return {"format_version": 2, "prompt": str(ds.prompt_text.values[prompt]), "tokens": tokens,
            "metadata": {**meta, "multi_pass": True}, "runs": runs, "pairwise": pairwise}


def format1_records(ds: xr.Dataset, prompt: int, lens: str = "raw") -> list[dict]:
    """The format-1 records of one stored prompt: one per embedding variant (one pair each)."""
    records = []
    for pair in prompt_records(ds, prompt, lens)["pairwise"]:
        meta = {key: pair["metadata"][key] for key in ("prompt_idx", "variant_name")}
        records.append({"prompt": pair["prompt"], "tokens": pair["tokens"],
                        "metadata": {**meta, "embedding_variant": pair["name"]},
                        "swap_options": pair["swap_options"], "layers": pair["layers"]})
    return records


def iter_json_chunks(ds: xr.Dataset, lens: str = "raw") -> Iterator[str]:
    """The file's text in pieces, one prompt at a time (same bytes as ``json.dump(all, indent=2)``).

    Format 2 (multi-pass) by default; format 1 when the store was captured in the legacy
    single-pass mode (``embedding_variants``).
    """
    single_pass = bool(ds.attrs.get("embedding_variants"))
    first = True
    yield "["
    for prompt in np.argsort(ds.prompt.values, kind="stable"):  # source order, whatever the store order
        records = format1_records(ds, prompt, lens) if single_pass else [prompt_records(ds, prompt, lens)]
        for record in records:
            yield ("\n" if first else ",\n") + textwrap.indent(json.dumps(record, indent=2), "  ")
            first = False
    yield "]" if first else "\n]"


def _check_exportable(ds: xr.Dataset, path) -> None:
    missing = [v for v in ("entropy", "kl", "topk_id", "rise_id") if v not in ds]
    if missing:
        raise StoreFormatError(path=path,
            detail="it has no lens statistics (captured with --no-lens), which the legacy JSON needs; "
                   "recapture without --no-lens")
    fingerprint = ds.attrs.get("content_fingerprint", {})
    if fingerprint.get("positions", "all") != "all" or list(ds.layer.values) != list(range(ds.sizes["layer"])):
        raise StoreFormatError(path=path, detail="it holds a subset of layers or positions (--layers/--positions); "
                               "the legacy JSON has every layer and token: capture without them to export")
    if not bool(np.asarray(ds.done.values).all()) or not bool(np.asarray(ds.lens_done.values).all()):
        raise StoreFormatError(path=path, detail="the capture is incomplete; rerun the capture command to finish it")


def _write_json(ds: xr.Dataset, lens: str, json_path: Path) -> Path:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(json_path) as partial, open(partial, "w", encoding="ascii") as fh:
        for piece in iter_json_chunks(ds, lens):
            fh.write(piece)
    return json_path


def export_json(store: str | Path, out_dir: str | Path = "outputs/export", lens: str = "raw") -> Path:
    """Write ``multi_pass_<ts>_<label>.json``, its ``.meta.json`` sidecar and a manifest row.

    Files go to ``out_dir/<pair_label>/``, the manifest to ``out_dir/manifest_multi.csv``
    (the legacy ``h200_outputs_multi`` layout). A store captured in the legacy
    single-pass mode (``embedding_variants``) gives ``out_dir/residual_compare_<ts>_<sft>.json``
    in format 1, with no sidecar, as the old tool did. The JSON is written to a
    temporary name and renamed when complete, so a failed export leaves no partial file.
    """
    if lens not in ("raw", "norm"):
        raise UsageError(f"--lens must be raw or norm, got {lens!r}")
    ds = open_store(store)
    _check_exportable(ds, store)
    models = ds.attrs.get("models", {})
    base_ref, sft_ref = models.get("base", {}).get("ref", "base"), models.get("sft", {}).get("ref", "sft")
    label = sanitize_label(f"{base_ref}_to_{sft_ref}")
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y%m%d_%H%M%S")
    if ds.attrs.get("embedding_variants"):  # legacy single-pass mode: format 1, no sidecar or manifest
        return _write_json(ds, lens, Path(out_dir) / f"residual_compare_{stamp}_{sanitize_label(sft_ref)}.json")
    target = Path(out_dir) / label
    target.mkdir(parents=True, exist_ok=True)
    json_path = _write_json(ds, lens, target / f"multi_pass_{stamp}_{label}.json")
    meta_path = target / f"{stamp}_{label}.meta.json"
    variants = list(dict.fromkeys(str(v) for v in ds.variant.values))
    meta = {"timestamp": stamp, "base_model": models.get("base", {}).get("ref"),
            "sft_model": models.get("sft", {}).get("ref"),
            "prompts_processed": len(set(int(i) for i in ds.prompt_index.values)), "prompt_variants": variants,
            "results_serialized": ds.sizes["prompt"], "multi_pass_runs": [str(p) for p in ds.pass_.values],
            "multi_pass_pairwise": [str(p) for p in ds.pair.values], "notes": META_NOTE}
    with atomic_output(meta_path) as partial:
        partial.write_text(json.dumps(meta, indent=2))
    manifest = Path(out_dir) / "manifest_multi.csv"
    new = not manifest.exists() or manifest.stat().st_size == 0
    with open(manifest, "a", newline="") as fh:
        if new:
            fh.write(MANIFEST_HEADER + "\n")
        csv.writer(fh).writerow([now.strftime("%Y-%m-%dT%H:%M:%S"), label, ds.sizes["prompt"], "|".join(variants),
                                 "true", str(json_path.resolve()), str(meta_path.resolve())])
    return json_path
