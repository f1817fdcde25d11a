"""The layering: store at the bottom, capture and analysis on top of it, never the other way round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("modules", [
    "analysis",
    "analysis, analysis.report, analysis.decompose, analysis.plots, analysis.compute, analysis.export_rows",
    "store, store.reader, store.writer, store.verify, store.testing, store.conversions.export_json, "
    "store.conversions.import_json, store.conversions.export_netcdf, store.cluster",
])
def test_analysis_and_store_import_no_torch(modules):
    """A notebook's ``import analysis`` (and every Dask worker that unpickles an analysis task)
    must not load torch, transformers or the capture package."""
    code = (f"import sys; import {modules}; "
            "print(sorted(m for m in ('torch', 'transformers', 'capture') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"`import {modules}` loaded {done.stdout.strip()}"


def test_store_and_analysis_never_import_capture():
    found = subprocess.run(["git", "grep", "-n", "-E", r"^\s*(from|import) capture", "--", "store", "analysis"],
                           cwd=ROOT, capture_output=True, text=True)
    assert found.stdout == "", found.stdout
