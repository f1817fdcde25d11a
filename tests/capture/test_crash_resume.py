"""Crash-safe resume: a capture killed with SIGKILL at many moments, resumed each time, equals an
uninterrupted capture bit for bit (resid, final and every statistic)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store.testing import assert_stores_equal
from store.verify import verify_store
from store.writer import FAULT_ENV

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The moon is bright.", "Yes", "Write a poem about rivers and stones.", "Two plus two.", "Hello there"]
# 5 prompts, one prompt per chunk and batch: 20 region writes (4 passes) and 5 lens groups to die in.
FAULTS = ["region:1", "region:6", "region:13", "region:20", "lens:1", "lens:3", "lens:5"]
TIMED = 3  # kills at random moments of a run, besides the planted ones


def _capture(tiny_pair, store: Path, fault: str | None = None, kill_after: float | None = None):
    args = [sys.executable, str(ROOT / "cli.py"), "capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store),
            "--chunk-prompts", "1", "--batch-size", "1", "--track", "Ġbeans", "--top-k", "5", "--quiet"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault:
        env[FAULT_ENV] = fault
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory):
    store = tmp_path_factory.mktemp("ref") / "ref.zarr"
    start = time.perf_counter()
    code, err = _capture(tiny_pair, store)
    assert code == 0, err
    return store, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("trial", [*FAULTS, *(f"timed:{i}" for i in range(TIMED))])
def test_killed_capture_resumes_to_the_same_store(trial, reference, tiny_pair, tmp_path):
    ref_store, ref_seconds = reference
    store = tmp_path / "s.zarr"
    if trial.startswith("timed:"):
        moment = random.Random(int(trial.split(":")[1])).uniform(0.2, 1.0) * ref_seconds
        code, _ = _capture(tiny_pair, store, kill_after=moment)
    else:
        code, _ = _capture(tiny_pair, store, fault=trial)
        assert code == -signal.SIGKILL  # it died where planted
    assert not list(tmp_path.glob("*.creating")) or not store.exists()  # never a half-made store in place
    if code != 0 and store.exists():
        problems = verify_store(store)
        assert all("not done" in p for p in problems), problems  # gaps are flagged, never hidden
    code, err = _capture(tiny_pair, store)
    assert code == 0, err
    assert verify_store(store) == []
    assert_stores_equal(ref_store, store)
