"""Shared helpers for the benchmarks: random-init model pairs built locally (no downloads)."""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from capture.inputs.prompts import DEV_PROMPTS_FILE
from capture.models.tiny import CHAT_FILE, CORPUS_FILE

SHAPES = {
    # name: (config class, kwargs)
    "gpt2-small": ("GPT2Config", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)),
    "qwen0.5b": ("Qwen2Config", dict(num_hidden_layers=24, hidden_size=896, num_attention_heads=14,
                                     num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                     tie_word_embeddings=True, max_position_embeddings=4096)),
    "qwen1.5b": ("Qwen2Config", dict(num_hidden_layers=28, hidden_size=1536, num_attention_heads=12,
                                     num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                     tie_word_embeddings=True, max_position_embeddings=4096)),
    # the rehearsal's stand-in for the others (gpu_session.sh --cpu-rehearsal): Qwen2's code, toy sizes
    "toy": ("Qwen2Config", dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=256, vocab_size=8192, tie_word_embeddings=True,
                                max_position_embeddings=1024)),
    # nvidia/Mistral-NeMo-Minitron-8B-Base's published config (random weights here)
    "minitron8b": ("MistralConfig", dict(num_hidden_layers=40, hidden_size=4096, num_attention_heads=32,
                                         num_key_value_heads=8, head_dim=128, intermediate_size=11520,
                                         vocab_size=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                                         rope_theta=1e6, max_position_embeddings=8192)),
}


def build_pair(shape: str, out_dir: Path, vocab_tokens: int = 400, dtype: str = "float32",
               device: str = "cpu") -> tuple[Path, Path]:
    """Two random-init models of ``shape`` (seeds 0 and 1) with a small byte-level tokenizer.

    ``dtype`` is the dtype saved in the checkpoint; ``device`` where the random init runs
    (``cuda`` builds a 1.5B model in seconds).
    """
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    suffix = "" if dtype == "float32" else f"-{dtype}"
    dirs = out_dir / f"{shape}{suffix}-base", out_dir / f"{shape}{suffix}-sft"
    if all((d / "config.json").exists() for d in dirs):
        return dirs
    bpe = ByteLevelBPETokenizer()
    texts = CORPUS_FILE.read_text().splitlines() + CHAT_FILE.read_text().splitlines()
    bpe.train_from_iterator(texts, vocab_size=vocab_tokens, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cls_name, kwargs = SHAPES[shape]
    for seed, path in enumerate(dirs):
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs),
                                                     dtype=getattr(torch, dtype))
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
    return dirs


def prompt_set(name: str) -> list[str]:
    """``dev``: the four dev prompts; ``64x100``: 64 prompts of about 100 tokens from the corpus."""
    if name == "dev":
        return DEV_PROMPTS_FILE.read_text().splitlines()
    lines = CORPUS_FILE.read_text().splitlines()
    return [" ".join(lines[(i + j) % len(lines)] for j in range(4)) for i in range(64)]


def sync() -> None:
    """Wait for queued CUDA work, so that a timer measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed(results: dict, key: str):
    sync()
    start = time.perf_counter()
    yield
    sync()
    results[key] = time.perf_counter() - start


class GpuBusy:
    """Samples NVML's GPU utilisation every ``interval`` seconds while in use and :attr:`active` is set.

    NVML reports, per sample period (1/6 s to 1 s depending on the card), the percentage
    of time one or more kernels ran; ``idle_fraction`` is one minus its mean over the samples.
    :func:`sampling_pass_loops` sets :attr:`active` over a capture's pass loops only, so model
    loading and set-up do not count as idle.
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval, self.samples, self.active = interval, [], threading.Event()

    def __enter__(self) -> GpuBusy:
        import threading

        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._stop = threading.Event()

        def poll() -> None:
            while not self._stop.wait(self.interval):
                if self.active.is_set():
                    self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def idle_fraction(self) -> float | None:
        return 1 - sum(self.samples) / (100 * len(self.samples)) if self.samples else None


@contextmanager
def around_pass_loops(context):
    """Run each of a capture's pass loops (``capture.pipeline.job``'s ``run_passes``) inside ``context()``."""
    import capture.pipeline.job as job

    original = job.run_passes

    def run_passes(*args, **kwargs):
        with context():
            yield from original(*args, **kwargs)

    job.run_passes = run_passes
    try:
        yield
    finally:
        job.run_passes = original


@contextmanager
def _event_set(event):
    event.set()
    try:
        yield
    finally:
        event.clear()


def sampling_pass_loops(active):
    """Set the event ``active`` while a capture's pass loop runs."""
    return around_pass_loops(lambda: _event_set(active))


@contextmanager
def timing_loads(times: dict, key: str = "load"):
    """Add the seconds a capture spends loading models and input embeddings to ``times[key]``."""
    import capture.pipeline.job as job

    originals = {name: getattr(job, name) for name in ("load_model", "load_input_embedding")}

    def timed_call(function):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - start
        return call

    for name, function in originals.items():
        setattr(job, name, timed_call(function))
    try:
        yield
    finally:
        for name, function in originals.items():
            setattr(job, name, function)


def emit_report(report: dict, out: str | None, quiet: bool = False) -> None:
    """Print a benchmark's JSON report (unless ``quiet``), and write it to ``out`` when given, whole, by a rename:
    a benchmark calls this after every measurement, so a run cut short keeps what it measured."""
    import json

    text = json.dumps(report, indent=2)
    if not quiet:
        print(text)
    if out:
        tmp = Path(f"{out}.partial")
        tmp.write_text(text)
        tmp.replace(out)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def plain_write(directory: Path, n_bytes: int, block: int = 64 << 20) -> float:
    """Seconds to write ``n_bytes`` sequentially to a new file in ``directory`` and fsync it."""
    data = np.random.default_rng(0).integers(0, 255, min(block, n_bytes), dtype=np.uint8).tobytes()
    path = directory / "plain.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            f.write(data[:left] if left < len(data) else data)
            left -= len(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def real_token_bytes(ds, n_tokens: int | None = None) -> int:
    """Bytes of the real-token residuals a capture store holds, before compression (resid and final, every
    pass): of its own ``n_tokens`` unless a token count is given."""
    per_token = ds.sizes["pass_"] * (ds.sizes["layer"] + 1) * ds.sizes["dim"] * ds.resid.dtype.itemsize
    return (int(ds.n_tokens.sum()) if n_tokens is None else n_tokens) * per_token
