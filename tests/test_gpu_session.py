"""benchmarks/gpu_session.sh: known to work before a GPU is lent (its CPU rehearsal), and sized to one call."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def test_stage_timeouts_fit_one_device_call():
    """The fixed stages' timeouts leave the 8B stage only what is left of 540 s, inside a 590 s call."""
    text = SCRIPT.read_text()
    limits = [int(s) for s in re.findall(r"^stage \w+ (\d+) ", text, flags=re.M)]
    budget = int(re.search(r"^BUDGET=(\d+)", text, flags=re.M).group(1))
    assert len(limits) == 4 and sum(limits) <= budget <= 540, (limits, budget)
    assert 'stage minitron "$LEFT"' in text and "LEFT=$(( BUDGET - " in text


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage_and_leaves_its_files(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-rehearsal"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stages = (tmp_path / "stages.txt").read_text()
    for name in ("tests", "syncs", "profile", "qwen", "minitron"):
        assert f"== {name} rc=0" in stages, stages
    for name in ("gpu.txt", "tests.log", "syncs.json", "profile_lens.log", "capture_qwen1.5b.json",
                 "capture_memory_minitron8b.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "syncs.json").read_text())["syncs_in_pass_loop"] == []  # nothing syncs on a CPU
    report = json.loads((tmp_path / "capture_qwen1.5b.json").read_text())
    assert {"forward", "load", "resid", "full", "write", "resid_load"} <= set(report["seconds"])
