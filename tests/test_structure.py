"""The layout holds: pipeline/ is the ground floor, no import cycle, a short training loop,
tests reach helpers through tests/support/, and the project stands without ../shared."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "eval", "slurm", "data_prep", "scripts")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """First-party modules imported anywhere in the file (function-local imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline import build` imports the module pipeline.build.
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}


def test_pipeline_imports_nothing_from_the_stages_above():
    bad = {(m, dep) for m, deps in _graph().items() if m.startswith("pipeline")
           for dep in deps if dep.split(".")[0] in ("eval", "slurm", "data_prep", "scripts")}
    assert not bad, f"pipeline/ reaches up: {sorted(bad)}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph[m]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_training_loop_functions_are_short():
    tree = ast.parse((ROOT / "pipeline" / "trainer.py").read_text())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"functions over 80 lines in pipeline/trainer.py: {long}"


def test_tests_use_support_not_each_other():
    for path in (ROOT / "tests").rglob("*.py"):
        text = path.read_text()
        assert "sys.path.insert" not in text or path.name == "test_structure.py", path
        for dep in _imports_any(path):
            assert not dep.split(".")[-1].startswith("test_"), f"{path} imports the test module {dep}"


def _imports_any(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_project_does_not_depend_on_shared():
    """A user who clones the project has no ../shared: nothing may point there."""
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".sh", ".cfg", ".txt"}
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and (p.suffix in suffixes or p.name == "Makefile") and p != Path(__file__)
                 and not any(part.startswith(".") or part == "quickstart_out" for part in p.relative_to(ROOT).parts)
                 and "../shared" in p.read_text(errors="replace")]
    assert not offenders, offenders
