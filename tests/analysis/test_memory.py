"""Decomposing (and reporting on) a store larger than the memory limit stays within the limit.

Peak memory is the child process's ``ru_maxrss``; the process's own footprint (interpreter and
libraries, measured the same way in a process that imports everything and opens the store) is not
counted by ``--memory-limit`` and is subtracted.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from store.chunking import Chunking
from store.testing import write_tiny_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 58 * 10**6  # 3 tiles of this store; measured without a limit: report +66 MB, decompose +58 MB
# The footprint that is not the computation's: imports, the store's metadata, and the numba kernel and
# tensorly loaded once (JIT runtime), as a process that did everything but compute would hold.
OVERHEAD = ("import cli, analysis.geometry.decompose, analysis.report.text, analysis.compute.context, numpy as np; "
            "from store.reader import open_store; from analysis.compute.dim_sums import residual_sums; "
            "from analysis.geometry.tensor import cp; open_store({path!r}); "
            "residual_sums([np.ones((2, 4), np.float16)] * 2, np.array([0]), np.array([1])); "
            "cp(np.random.rand(3, 4, 5), 2)")


def _peak(args: list[str]) -> int:
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert status == 0, proc.stderr.read().decode()[-2000:]
    return usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "s.zarr"
    write_tiny_store(path, n_prompts=64, n_layers1=9, hidden=256, lengths=tuple(128 - (i % 4) * 20 for i in range(64)),
                     store_dtype="float16", chunking=Chunking(prompt=4, layer=9))
    return path


def test_decompose_and_report_stay_within_the_limit(big_store, tmp_path):
    resid_bytes = 4 * 64 * 9 * 128 * 256 * 2
    assert resid_bytes > LIMIT
    overhead = _peak([sys.executable, "-c", OVERHEAD.format(path=str(big_store))])
    decompose = _peak([sys.executable, "cli.py", "decompose", str(big_store), "--memory-limit", str(LIMIT),
                       "--quiet", "--out", str(tmp_path / "d.zarr")])
    report = _peak([sys.executable, "cli.py", "report", str(big_store), "--memory-limit", str(LIMIT), "--quiet"])
    assert decompose - overhead <= LIMIT, (decompose - overhead) / 1e6
    assert report - overhead <= LIMIT, (report - overhead) / 1e6
