"""Legacy YAML configs (the ``residual_compare:`` section) turned into capture settings.

Users keep their old config files: ``cli.py capture --config dev_config.yaml``. The
``RESIDUAL_*`` environment overrides apply on top of the file, and command-line flags
on top of both. Keys that only made sense for the old rented-GPU runs are accepted
and reported as ignored; unknown keys are an error (a typo should not pass silently).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from store.errors import UsageError
from store.units import DTYPE_ALIASES

SECTION = "residual_compare"
IGNORED_KEYS = {
    "local_run": "GPU-rental checks of the old tool; resdiff runs wherever it is started",
}
DTYPE_NAMES = {name: dtype for name, dtype in DTYPE_ALIASES.items() if name == name.lower()}  # the config's
ENV_KEYS = {
    "RESIDUAL_BASE_MODEL": "base_model", "RESIDUAL_SFT_MODEL": "sft_model", "RESIDUAL_TOKENIZER": "tokenizer",
    "RESIDUAL_DEVICE": "device", "RESIDUAL_DTYPE": "dtype", "RESIDUAL_PROMPT_FILE": "prompt_file",
    "RESIDUAL_TOKENIZER_KWARGS": "tokenizer_kwargs", "RESIDUAL_MODEL_KWARGS": "model_kwargs",
}
KNOWN_KEYS = {
    "base_model", "sft_model", "tokenizer", "device", "dtype", "top_k", "prompts", "prompt_file", "prompt_variants",
    "prompt_variant_options", "tracked_token_ids", "tracked_token_strings", "interesting_token_map",
    "model_kwargs", "tokenizer_kwargs", "multi_pass", "embedding_variants", "model_sweep", *IGNORED_KEYS,
}


def _env_overrides(section: dict, environ) -> dict:
    section = dict(section)
    for var, key in ENV_KEYS.items():
        value = (environ.get(var) or "").strip()
        if not value:
            continue
        if key.endswith("_kwargs"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{var} must be a JSON object: {exc}") from None
        section[key] = value
    return section


def _pairs_spec(entries: list, config: Path) -> str:
    """``pairwise_differences`` in its three spellings -> ``--pass-pair``."""
    specs = []
    for entry in entries:
        if isinstance(entry, dict):
            left, right = entry.get("base", entry.get("lhs")), entry.get("sft", entry.get("rhs"))
            name = entry.get("name")
        elif isinstance(entry, (list, tuple)) and len(entry) in (2, 3):
            left, right, name = entry[0], entry[1], entry[2] if len(entry) == 3 else None
        else:
            left = right = name = None
        if not left or not right:
            raise UsageError(f"{config}: multi_pass.pairwise_differences entry {entry!r} must name a left and a "
                             "right run: [left, right], [left, right, name] or {base: ..., sft: ..., name: ...}")
        specs.append(f"{name}={left}-{right}" if name else f"{left}-{right}")
    return ",".join(specs)


def _passes_spec(runs: list, config: Path) -> str:
    specs = []
    for run in runs:
        if not isinstance(run, dict) or not run.get("name") or run.get("model") not in ("base", "sft"):
            raise UsageError(f"{config}: multi_pass.runs entry {run!r} needs a name and model: base or sft")
        embedding = run.get("embedding_source") or run["model"]
        unembedding = run.get("unembedding_source") or run["model"]
        specs.append(f"{run['name']}={run['model']}:{embedding}:{unembedding}")
    return ",".join(specs)


def _embedding_variants(entries: list, config: Path) -> dict:
    """Legacy ``embedding_variants`` -> passes ``v.base``, ``v.sft`` and pair ``v`` for each variant ``v``."""
    passes, pairs, names = [], [], []
    for entry in entries:
        name = str(entry.get("name", "")) if isinstance(entry, dict) else ""
        if not name or any(ch in name for ch in "-:,="):
            raise UsageError(f"{config}: embedding_variants entry {entry!r} needs a name without - : , =")
        for side in ("base", "sft"):
            options = entry.get(side) or {}
            sources = [options.get(key) or "self" for key in ("embedding_source", "unembedding_source")]
            embedding, unembedding = (side if s == "self" else s for s in sources)
            if embedding not in ("base", "sft") or unembedding not in ("base", "sft"):
                raise UsageError(f"{config}: embedding_variants {name}.{side} sources must be base, sft or self")
            passes.append(f"{name}.{side}={side}:{embedding}:{unembedding}")
        pairs.append(f"{name}={name}.base-{name}.sft")
        names.append(name)
    return {"passes": ",".join(passes), "pass_pairs": ",".join(pairs), "embedding_variants": names}


def sweep_pairs(section: dict, config: Path) -> dict[str, dict]:
    """``model_sweep`` entries as named pairs: name -> CaptureSettings fields (base, sft, tokenizer, dtype)."""
    pairs = {}
    for entry in section.get("model_sweep") or []:
        base = entry.get("base_model") or entry.get("base") if isinstance(entry, dict) else None
        sft = (entry.get("sft_model") or entry.get("sft") or base) if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not entry.get("name") or not base:
            raise UsageError(f"{config}: model_sweep entry {entry!r} needs a name and a base_model")
        fields = {"base": str(base), "sft": str(sft), "model_pair": None,
                  "tokenizer": entry.get("tokenizer") or str(sft)}
        if entry.get("dtype"):
            fields["dtype"] = DTYPE_NAMES.get(str(entry["dtype"]).lower(), str(entry["dtype"]))
        pairs[str(entry["name"])] = fields
    return pairs


def _tracked(section: dict) -> list[str]:
    tracked = [str(int(i)) for i in section.get("tracked_token_ids") or []]
    tracked += [str(s) for s in section.get("tracked_token_strings") or []]
    tracked += [str(v) for v in (section.get("interesting_token_map") or {}).values()]
    return tracked


def load_legacy_config(path: str | Path, environ=os.environ, model_pair: str | None = None) -> tuple[dict, list[str]]:
    """Read a legacy config; return (CaptureSettings fields, notes for the user).

    ``model_pair`` names a ``model_sweep`` entry to capture instead of base_model/sft_model.
    """
    import yaml

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UsageError(f"config file {str(path)!r} does not exist; check the path") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(document, dict) or not isinstance(document.get(SECTION, document), dict):
        raise UsageError(f"config file {str(path)!r} must be a mapping with a {SECTION!r} section")
    section = _env_overrides(document.get(SECTION, document), environ)
    unknown = sorted(set(section) - KNOWN_KEYS)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)} in {SECTION}; known keys: "
                         f"{', '.join(sorted(KNOWN_KEYS))}")
    notes = [f"{path}: {key} ignored ({why})" for key, why in IGNORED_KEYS.items() if key in section]
    if section.get("model_sweep"):
        names = ", ".join(sweep_pairs(section, path))
        notes.append(f"{path}: model_sweep entries usable as --pair NAME with this config: {names}")
    fields: dict = {}
    if section.get("base_model") or section.get("sft_model"):
        fields["base"] = section.get("base_model") or section.get("sft_model")
        fields["sft"] = section.get("sft_model") or section.get("base_model")
        fields["model_pair"] = None
        fields["tokenizer"] = section.get("tokenizer") or fields["sft"]  # legacy: null means the SFT's
    elif section.get("tokenizer"):
        fields["tokenizer"] = section["tokenizer"]
    if section.get("device"):
        fields["device"] = str(section["device"])
    if section.get("dtype") is not None:
        dtype = str(section["dtype"]).lower()
        if dtype not in DTYPE_NAMES:
            raise UsageError(f"{path}: dtype {section['dtype']!r} is not one of {', '.join(DTYPE_NAMES)}")
        fields["dtype"] = DTYPE_NAMES[dtype]
    if section.get("top_k") is not None:
        fields["top_k"] = int(section["top_k"])
    if section.get("prompts"):
        fields["prompts"] = [str(p) for p in section["prompts"]]
    if section.get("prompt_file"):
        prompt_file = Path(section["prompt_file"])
        if not prompt_file.is_absolute() and not prompt_file.exists() and (path.parent / prompt_file).exists():
            prompt_file = path.parent / prompt_file
        fields["prompts_files"] = [str(prompt_file)]
    if section.get("prompt_variants"):
        fields["variants"] = [str(v) for v in section["prompt_variants"]]
    if section.get("prompt_variant_options"):
        fields["variant_options"] = dict(section["prompt_variant_options"])
    if _tracked(section):
        fields["track"] = _tracked(section)
    for key in ("model_kwargs", "tokenizer_kwargs"):
        if section.get(key):
            fields[key] = dict(section[key])
    sweep = sweep_pairs(section, path)
    if model_pair is not None and model_pair in sweep:
        fields.update(sweep[model_pair])
        notes.append(f"{path}: --pair {model_pair} is the config's model_sweep entry {model_pair!r}")
    multi = section.get("multi_pass") or {}
    if not multi.get("enabled"):  # the legacy single-pass mode: one pass pair per embedding variant (format 1)
        fields.update(_embedding_variants(section.get("embedding_variants") or [{"name": "default"}], path))
    else:
        if section.get("embedding_variants"):
            notes.append(f"{path}: embedding_variants ignored because multi_pass is enabled (as the old tool did)")
        if multi.get("runs"):
            fields["passes"] = _passes_spec(multi["runs"], path)
        if multi.get("pairwise_differences"):
            fields["pass_pairs"] = _pairs_spec(multi["pairwise_differences"], path)
    return fields, notes
