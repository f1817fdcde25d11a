"""Stores of format 1 (written by resdiff before ragged layouts) stay readable by every command.

``tests/data/v1_tiny.zarr`` was captured by the format-1 code (the tiny pair, three prompts
of 6, 29 and 4 tokens, statistics, a tracked token, the lens saved); its legacy JSON export
then had the SHA-256 in ``v1_tiny.export.sha256``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis import open_store, pair_metrics, real_positions
from cli import main

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def old(tmp_path) -> Path:
    path = tmp_path / "v1.zarr"
    shutil.copytree(DATA / "v1_tiny.zarr", path)
    return path


def test_every_command_reads_a_format_1_store(old, tmp_path, capsys):
    assert main(["info", str(old)]) == 0
    assert "format 1" in capsys.readouterr().out
    assert main(["verify", str(old)]) == 0
    assert main(["report", str(old), "--top-n", "2", "--metric", "kl", "--token-id", "10", "--prompt-index", "1"]) == 0
    assert "kl by layer" in capsys.readouterr().out
    assert main(["decompose", str(old), "--quiet", "--out", str(tmp_path / "d.zarr")]) == 0
    assert main(["plot", str(old), "--quiet", "--out", str(tmp_path / "plots"), "--prompt-index", "1"]) == 0
    assert main(["export-netcdf", str(old), str(tmp_path / "ss.nc"), "--sel", "pass_=SS"]) == 0
    assert main(["export-json", str(old), "--out", str(tmp_path / "json")]) == 0
    (exported,) = (tmp_path / "json").rglob("multi_pass_*.json")
    assert hashlib.sha256(exported.read_bytes()).hexdigest() == (DATA / "v1_tiny.export.sha256").read_text().strip()


def test_analysis_reads_a_format_1_store(old):
    ds = open_store(old)
    assert list(ds.prompt.values) == [0, 1, 2] and ds.n_tokens.values.tolist() == [6, 29, 4]
    norm_diff = pair_metrics(ds).norm_diff.compute()
    assert np.isfinite(norm_diff.sel(prompt=1).values).all()
    assert np.isnan(norm_diff.sel(prompt=0).values[:, :, 6:]).all()
    assert real_positions(ds).sizes["position"] == 39


def test_a_capture_does_not_resume_a_format_1_store(old, tiny_pair, capsys):
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(old), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has format 1" in err and "--overwrite" in err and err.count("\n") == 1
