"""Loading models and tokenizers, and finding the parts capture hooks into.

Shapes are checked from configs before any weights are loaded, so that an
incompatible pair fails in seconds rather than after a multi-GB download or load.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from capture.errors import IncompatibleModels, MismatchedArchitectures, ModelLoadError, ModelMissing, PickleRefused
from store.units import MODEL_DTYPES

DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}  # names of store.units, as torch dtypes


@dataclass(frozen=True)
class ModelShape:
    """The numbers that must agree between base and SFT for embeddings to be swapped."""

    arch: str
    n_layers: int
    hidden: int
    vocab: int
    max_positions: int | None


def _is_local(ref: str) -> bool:
    return os.path.isdir(ref)


def _load_error(what: str, ref: str, exc: Exception) -> ModelLoadError:
    lines = str(exc).strip().splitlines()
    reason = (lines[0] if lines else type(exc).__name__)[:300]
    if _is_local(ref):
        return ModelLoadError(what=what, ref=ref, reason=reason)
    if ref.startswith((".", "/", "~")) or os.sep + os.sep in ref:
        return ModelLoadError(what=what, ref=ref, reason="no such directory")
    return ModelMissing(what=what, ref=ref, reason=reason)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safe_weights(ref: str, allow_pickle: bool = False) -> None:
    """Refuse a local checkpoint whose weights exist only as pickle files, unless ``allow_pickle``.

    Hub ids are checked by transformers itself (``use_safetensors=True``, see
    :meth:`CaptureSettings.load_kwargs`).
    """
    if allow_pickle or not _is_local(ref):
        return
    files = [p.name for p in Path(ref).iterdir() if p.is_file()]
    if any(f.endswith(".safetensors") for f in files):
        return
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise PickleRefused(ref=ref, files=", ".join(pickles[:3]))


def _text_config(config):
    return getattr(config, "text_config", None) or config


def read_shape(ref: str, trust_remote_code: bool = False) -> ModelShape:
    """Read a model's shape from its config alone (no weights)."""
    from transformers import AutoConfig

    try:
        config = _text_config(AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code))
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        raise _load_error("model", ref, exc) from None
    return ModelShape(
        arch=config.model_type,
        n_layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        vocab=int(config.vocab_size),
        max_positions=getattr(config, "max_position_embeddings", None),
    )


def check_compatible(base: ModelShape, sft: ModelShape, refs: dict[str, str] | None = None,
                     allow_mismatched: bool = False) -> None:
    """Raise :class:`IncompatibleModels` naming every field that differs, and
    :class:`MismatchedArchitectures` for two architectures unless ``allow_mismatched``.

    Shapes are checked first: no flag makes a swap of different shapes possible.
    """
    labels = {"vocab": "vocabulary size", "hidden": "hidden size", "n_layers": "layer count"}
    diffs = [
        f"{label} {getattr(base, field)} (base) vs {getattr(sft, field)} (SFT)"
        for field, label in labels.items()
        if getattr(base, field) != getattr(sft, field)
    ]
    if diffs:
        raise IncompatibleModels(detail="; ".join(diffs))
    if base.arch != sft.arch and not allow_mismatched:
        refs = refs or {}
        raise MismatchedArchitectures(base=base.arch, sft=sft.arch, base_ref=refs.get("base", "base"),
                                      sft_ref=refs.get("sft", "sft"))


def load_tokenizer(ref: str, trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:
        raise _load_error("tokenizer", ref, exc) from None


def load_model(
    ref: str,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | None = None,
    trust_remote_code: bool = False,
    **kwargs,
) -> nn.Module:
    """Load a causal LM for inference (eval mode, no grad, no KV cache)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=DTYPES[dtype], device_map=device_map, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as exc:
        raise _load_error("model", ref, exc) from None
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model


def release_memory(model_ref: weakref.ref | None = None) -> None:
    """Return freed model memory (CPU and CUDA) before the next model loads.

    Call it after dropping every reference to the model. With a weak reference to
    the model, the (slow, for a large heap) garbage collection runs only when a
    reference cycle still holds the model alive.
    """
    if model_ref is None or model_ref() is not None:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def decoder(model: nn.Module) -> nn.Module:
    """The transformer body without the LM head (``GPT2Model``, ``Qwen2Model``, ...)."""
    return model.get_decoder()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks, found as the ModuleList with ``num_hidden_layers`` entries."""
    n_layers = _text_config(model.config).num_hidden_layers
    body = decoder(model)
    for name in ("layers", "h", "blocks"):
        mods = getattr(body, name, None)
        if isinstance(mods, nn.ModuleList) and len(mods) == n_layers:
            return mods
    for mods in body.modules():
        if isinstance(mods, nn.ModuleList) and len(mods) == n_layers:
            return mods
    raise ModelLoadError(
        f"cannot find the {n_layers} decoder blocks of {type(model).__name__}; this architecture is not "
        "supported yet, please report it"
    )


def final_norm(model: nn.Module) -> nn.Module:
    """The final norm applied after the last block (``ln_f``, ``norm``, ...)."""
    body = decoder(model)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f"):
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ModelLoadError(
        f"cannot find the final norm of {type(model).__name__}; this architecture is not supported yet, "
        "please report it"
    )


def input_embedding_copy(
    model: nn.Module, device: str | torch.device, shared_weight: torch.Tensor | None = None
) -> nn.Module:
    """A detached copy of the model's input embedding module, kept after the model is freed.

    The module (not its weight) is copied so that architectures which scale inside
    the embedding module (the Gemma family) keep doing so. ``shared_weight``, when the
    model's embedding is tied to its head and the lens already holds a copy of that
    weight on ``device``, is used instead of a second copy.
    """
    original = model.get_input_embeddings()
    memo = {}
    if shared_weight is not None and original.weight is model.get_output_embeddings().weight:
        memo[id(original.weight)] = nn.Parameter(shared_weight, requires_grad=False)
    module = copy.deepcopy(original, memo).to(device)
    return module.eval().requires_grad_(False)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (no memory) while buffers stay real.

    Buffers such as Gemma's embedding scale are computed in ``__init__`` and are not
    in the checkpoint, so they must be materialised; parameters are read from disk.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _read_checkpoint_tensor(ref: str, keys: list[str]) -> torch.Tensor | None:
    """Read one tensor from a safetensors checkpoint without loading the rest."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    shard_of: dict[str, str] = {}
    index = cached_file(ref, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as fh:
            shard_of = json.load(fh)["weight_map"]
    for key in keys:
        filename = shard_of.get(key, "model.safetensors" if not shard_of else None)
        path = filename and cached_file(ref, filename, _raise_exceptions_for_missing_entries=False)
        if not path:
            continue
        with safe_open(path, framework="pt") as fh:
            if key in fh.keys():
                return fh.get_tensor(key)
    return None


def load_input_embedding(
    ref: str, dtype: str = "float32", device: str | torch.device = "cpu", trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> nn.Module:
    """Load only a model's input embedding module (weights read from its checkpoint).

    This is what lets one model stay resident: the other model contributes only its
    embedding module. Falls back to loading the whole model once when the checkpoint
    is not in safetensors form.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
        from transformers.initialization import no_init_weights

        with _parameters_on_meta(), no_init_weights():
            skeleton = AutoModelForCausalLM.from_config(
                config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
            )
        module = skeleton.get_input_embeddings()
        name = next(n for n, m in skeleton.named_modules() if m is module)
        prefix = skeleton.base_model_prefix + "."
        keys = [f"{name}.weight", f"{name.removeprefix(prefix)}.weight"]
        weight = _read_checkpoint_tensor(ref, keys)
    except Exception as exc:
        raise _load_error("input embeddings of", ref, exc) from None
    if weight is None:
        if not allow_pickle:
            raise PickleRefused(ref=ref, files="no safetensors file")
        full = load_model(ref, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
        module = input_embedding_copy(full, device)
        del full
        release_memory()
        return module
    module.weight = nn.Parameter(weight.to(device=device, dtype=DTYPES[dtype]), requires_grad=False)
    del skeleton
    return module.to(device).eval().requires_grad_(False)
