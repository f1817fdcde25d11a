"""A real client: the ``dictionary-learning`` package from PyPI trains an SAE from the loader's batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = Path(sys.prefix) / "clients"  # `make clients` (requirements-clients.txt), outside the main environment


def _clients_or_skip() -> None:
    if not (CLIENTS / "dictionary_learning").is_dir():
        message = f"dictionary-learning is not installed in {CLIENTS}: run `make clients`"
        if os.environ.get("RESDIFF_REQUIRE_CLIENTS"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.slow
def test_train_sae_on_sft_minus_base_differences_loss_falls(tiny_pair, tmp_path):
    _clients_or_skip()
    from capture.models.tiny import CORPUS_FILE
    from capture.pipeline.job import run_capture
    from capture.settings import CaptureSettings

    base, sft, _ = tiny_pair
    prompts = [line for line in CORPUS_FILE.read_text().splitlines() if line.strip()][:200]
    store = tmp_path / "s.zarr"
    run_capture(CaptureSettings(base=base, sft=sft, prompts=prompts, store=str(store), lens=False, device="cpu"),
                log=lambda *a: None, progress=False)
    env = {**os.environ, "PYTHONPATH": str(CLIENTS), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "train_sae.py"), str(store),
                           "--layer", "2", "--steps", "300", "--batch-size", "128"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["end"]["mse"] < 0.2 * result["start"]["mse"], result
    assert result["end"]["frac_variance_explained"] > 0.8 > result["start"]["frac_variance_explained"], result
    dry = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "train_sae.py"), str(store),
                          "--layer", "2", "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert dry.returncode == 0 and json.loads(dry.stdout)["rows"] == result["rows"]


def test_crosscoder_layout_is_batch_models_dim(capture_store):
    """dictionary-learning 0.1.0 has no crosscoder; the documented layout is (batch, n_models, dim), model
    i being the i-th pass asked for."""
    from analysis import activation_loader, open_store

    store = capture_store("llama")
    ds = open_store(store)
    loader = activation_loader(store, layer=1, passes=("BB", "SS"), batch_size=8, with_positions=True,
                               include_massive=True)
    batch, positions = next(iter(loader))
    assert tuple(batch.shape) == (8, 2, ds.sizes["dim"])
    label, token = positions[0].tolist()
    for i, name in enumerate(("BB", "SS")):
        want = ds.resid.sel(pass_=name, prompt=label, token=token, layer=1).values
        assert batch[0, i].numpy().tolist() == want.astype("float32").tolist()
