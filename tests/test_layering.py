"""The layering: store at the bottom, capture and analysis on top of it, never the other way round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Modules that load torch on purpose, when a user asks for what they do (the loader's torch side).
TORCH_BY_DESIGN = {"analysis.loader.torch_dataset"}


def modules_of(package: str) -> list[str]:
    """Every module of ``package`` as found in the tree (a new module is covered without editing this test)."""
    files = sorted((ROOT / package).rglob("*.py"))
    names = [".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files if "__pycache__" not in f.parts]
    return [n.removesuffix(".__init__") for n in names if n.removesuffix(".__init__") not in TORCH_BY_DESIGN]


def test_the_module_lists_come_from_the_tree():
    assert {"store.writer", "store.shard_io", "store.conversions.export_json"} <= set(modules_of("store"))
    assert {"analysis", "analysis.report.text", "analysis.loader.activations"} <= set(modules_of("analysis"))
    assert "analysis.loader.torch_dataset" not in modules_of("analysis")


@pytest.mark.parametrize("modules", [["analysis"], modules_of("analysis"), modules_of("store")],
                         ids=["import analysis", "every analysis module", "every store module"])
def test_analysis_and_store_import_no_torch(modules):
    """A notebook's ``import analysis`` (and every Dask worker that unpickles an analysis task)
    must not load torch, transformers or the capture package."""
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('torch', 'transformers', 'capture') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"`import {', '.join(modules)}` loaded {done.stdout.strip()}"


def test_store_never_imports_analysis():
    found = subprocess.run(["git", "grep", "-n", "-E", r"^\s*(from|import) analysis", "--", "store"],
                           cwd=ROOT, capture_output=True, text=True)
    assert found.stdout == "", found.stdout


def test_store_and_analysis_never_import_capture():
    found = subprocess.run(["git", "grep", "-n", "-E", r"^\s*(from|import) capture", "--", "store", "analysis"],
                           cwd=ROOT, capture_output=True, text=True)
    assert found.stdout == "", found.stdout


def _import_graph() -> dict[str, set[str]]:
    """Every first-party module -> the first-party modules it imports, at its top or inside a function
    (``from pkg import sub`` counts as importing the submodule, not the package)."""
    import ast

    modules = {name: ROOT.joinpath(*name.split(".")).with_suffix(".py") for name in
               [*modules_of("store"), *modules_of("capture"), *modules_of("analysis"), *TORCH_BY_DESIGN]}
    modules = {name: path if path.exists() else path.with_suffix("") / "__init__.py" for name, path in modules.items()}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it back (deferred imports too)."""
    graph = _import_graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert not cycles, f"modules in an import cycle: {', '.join(cycles)}"


def _under(graph: dict[str, set[str]], package: str) -> set[str]:
    return {m for m in graph if m.startswith(package + ".")}


def test_planning_never_imports_execution():
    """What a capture will do (plans, budgets, batches, the stored window) is decided without the code that runs it."""
    graph = _import_graph()
    planning = _under(graph, "capture.plan") | _under(graph, "capture.inputs")
    execution = _under(graph, "capture.pipeline")
    assert {"capture.plan.prepare", "capture.plan.memory", "capture.inputs.selection"} <= planning
    assert {"capture.pipeline.runner", "capture.pipeline.job"} <= execution
    for module in planning:
        seen, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        assert not seen & execution, f"{module} imports {', '.join(sorted(seen & execution))}"


# Each layer's errors and commands live with it, under one name; every other module name says one thing in the
# whole tree.
SHARED_NAMES = {"__init__", "errors", "commands"}


def test_no_module_name_repeated_across_packages():
    """``lens.py`` in two packages meant two different things; a module's name is unique in the tree."""
    seen: dict[str, str] = {}
    for package in ("store", "capture", "analysis"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.stem in SHARED_NAMES or "__pycache__" in path.parts:
                continue
            where = str(path.relative_to(ROOT))
            assert path.stem not in seen, f"{where} and {seen[path.stem]} share a name"
            seen[path.stem] = where
    assert len(seen) > 60


def test_subsystems_are_folders():
    """The flat prefixes of old (``lens_*``, ``loader_*``, ``model_*``) are subpackages; no stray modules."""
    allowed_flat = {"capture": {"settings", "config", "errors", "commands"}, "analysis": {"commands"}}
    for package, flat in allowed_flat.items():
        modules = {p.stem for p in (ROOT / package).glob("*.py")} - {"__init__"}
        assert modules == flat, f"{package}/ has flat modules {sorted(modules - flat)}; put them in a subsystem"
