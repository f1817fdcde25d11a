"""The package as a user installs it: declared dependencies, a wheel, the console script."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"capture", "store", "analysis", "cli", "tests"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {_canonical(re.match(r"[A-Za-z0-9_.-]+", spec).group(0)) for spec in specs}


def _imported_modules() -> dict[str, str]:
    """Top-level module name -> a file that imports it, over every module of the package."""
    found: dict[str, str] = {}
    files = [ROOT / "cli.py", *(p for pkg in ("capture", "store", "analysis") for p in (ROOT / pkg).rglob("*.py"))]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_library_is_declared():
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = []
    for module, where in sorted(_imported_modules().items()):
        if module in FIRST_PARTY or module in sys.stdlib_module_names or module == "__future__":
            continue
        owners = {_canonical(d) for d in distributions.get(module, [])}
        assert owners, f"{module} (imported in {where}) belongs to no installed distribution"
        if not owners & declared:
            missing.append(f"{module} ({', '.join(sorted(owners))}, imported in {where})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def _run(args: list[str], cwd: Path, timeout: int = 900) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={
        "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_repository(tmp_path):
    """Build a wheel, install it with its dependencies into a new venv (pinned to the tested working set;
    torch from the local CPU build), then run the console script from another directory."""
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
          str(ROOT)], cwd=tmp_path)
    (wheel,) = tmp_path.glob("resdiff-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    pins = tmp_path / "constraints.txt"  # the tested working set; constraints may not carry extras
    pins.write_text(re.sub(r"\[[^]]*\]", "", (ROOT / "requirements.txt").read_text()))
    _run([*pip, "install", "-q", "torch==2.13.0", str(wheel), "-c", str(pins)], cwd=tmp_path, timeout=1800)
    _run([*pip, "check"], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    resdiff = str(venv / "bin" / "resdiff")
    assert "capture" in _run([resdiff, "--help"], cwd=work)
    out = _run([resdiff, "capture", "--prompt", "Hello there.", "--store", "a.zarr", "--cache-dir", "models",
                "--quiet"], cwd=work)
    assert "complete   4/4 pass x prompt regions" in out
    assert "OK" in _run([resdiff, "verify", "a.zarr"], cwd=work)


def test_the_environment_imports_resdiff_from_any_directory(tmp_path):
    """`make` installs resdiff into .venv (editable), so a notebook anywhere can `import analysis`."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", "import analysis, capture.pipeline.job, store.reader, cli; "
                           "print(analysis.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"resdiff is not installed in this environment (run `make env`): {proc.stderr}"
    assert Path(proc.stdout.strip()).resolve().is_relative_to(ROOT)  # this checkout, editable
