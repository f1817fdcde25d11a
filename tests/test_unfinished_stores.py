"""Every analysis command on a store whose capture was killed: what is missing is said in one line, and nothing
derived from it is printed (no 0.0000 rates, no NaN tables, a note in the HTML instead of an empty panel)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main
from store.writer import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The moon is bright tonight.", "Yes", "Write a poem about rivers.", "Two plus two."]
pytestmark = pytest.mark.slow


def _killed_capture(tiny_pair, store: Path, fault: str) -> None:
    args = [sys.executable, str(ROOT / "cli.py"), "capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store),
            "--chunk-prompts", "1", "--shard-size", "1", "--batch-size", "1", "--top-k", "5", "--save-lens", "--quiet"]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    env = {**os.environ, FAULT_ENV: fault}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed where the fault was planted


@pytest.fixture(scope="module")
def lens_killed(tiny_pair, tmp_path_factory):
    store = tmp_path_factory.mktemp("killed") / "lens.zarr"
    _killed_capture(tiny_pair, store, "lens:3")  # two of four prompt groups have their statistics
    return store


NOTE = "note: lens statistics: unfinished, 2 of 4 prompts done (the capture stopped in its lens stage)"
COMMANDS = {
    "report": ["report", "{store}", "--memory-limit", "1GB"],
    "report-runs": ["report", "{store}", "--record-type", "runs", "--metric", "norm"],
    "plot": ["plot", "{store}", "--html", "--out", "{tmp}/plots"],
    "export-netcdf": ["export-netcdf", "{store}", "{tmp}/x.nc", "--sel", "pass_=SS"],
}
QUIET = {  # commands that read no lens statistics: no note, and their numbers as always
    "factorial": ["factorial", "{store}"],
    "diff-lens": ["diff-lens", "{store}", "--layer", "1"],
    "decompose": ["decompose", "{store}", "--out", "{tmp}/d.zarr"],
    "loader-stats": ["loader-stats", "{store}", "--layer", "1"],
}


def _run(args, store, tmp_path, capsys) -> tuple[int, str, str]:
    code = main([a.format(store=store, tmp=tmp_path) for a in args])
    said = capsys.readouterr()
    return code, said.out, said.err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_that_read_lens_statistics_say_they_are_unfinished(name, lens_killed, tmp_path, capsys):
    code, out, err = _run(COMMANDS[name], lens_killed, tmp_path, capsys)
    assert code == 0, err
    assert out.count(NOTE) == 1 and "rerun the same `capture` command to finish it" in out
    assert "token distribution shift rate" not in out and "shift rate)" not in out  # no rate of unwritten ids
    assert not re.search(r"\bkl\b.*by layer|entropy_(left|right) by|tracked logit changes", out)
    assert not re.search(r"\bnan\b", out, re.IGNORECASE), out
    if name == "plot":
        page = (tmp_path / "plots" / "report.html").read_text()
        assert "unfinished, 2 of 4 prompts done" in page and 'class="note">Not shown:' in page
        assert "Largest KL" in page and "<th>KL [nats]</th>" not in page  # a note instead of an empty panel
    if name == "export-netcdf":
        import xarray as xr

        with xr.open_dataset(tmp_path / "x.nc") as nc:
            assert "kl" not in nc and "entropy" not in nc and "resid" in nc


@pytest.mark.parametrize("name", sorted(QUIET))
def test_commands_that_read_only_residuals_are_unaffected(name, lens_killed, tmp_path, capsys):
    code, out, err = _run(QUIET[name], lens_killed, tmp_path, capsys)
    assert code == 0, err
    assert "note: lens statistics" not in out


def test_asking_for_an_unfinished_statistic_is_refused_in_one_line(lens_killed, tmp_path, capsys):
    for args in (["report", "{store}", "--metric", "kl"], ["export-netcdf", "{store}", "{tmp}/y.nc", "--vars", "kl"],
                 ["export-json", "{store}", "--out", "{tmp}/json"]):
        code, _out, err = _run(args, lens_killed, tmp_path, capsys)
        assert code == 2 and err.count("\n") == 1 and "unfinished, 2 of 4 prompts done" in err, (args, err)
    assert not (tmp_path / "y.nc").exists() and not list((tmp_path).glob("json/*/*.json"))


def test_unfinished_residuals_are_refused_by_every_command(tiny_pair, tmp_path, capsys):
    store = tmp_path / "resid.zarr"
    _killed_capture(tiny_pair, store, "region:6")
    for args in [*COMMANDS.values(), *QUIET.values(), ["export-json", "{store}", "--out", "{tmp}/json"]]:
        code, _out, err = _run(args, store, tmp_path, capsys)
        assert code == 2 and err.count("\n") == 1, (args, err)
        assert "pass x prompt regions were never written" in err and "rerun the same `capture` command" in err
