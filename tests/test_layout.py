"""The source's layout, checked from its text (AST), so it stays true:

* imports point one way: the pure core (no mlflow, kfp, optuna or boto3, not even inside a
  function) <- the edges that talk to services (storage, tracking) and the sources <- the
  steps <- the sweep <- the CLI; components and pipelines sit on top of the steps;
* no import cycle between modules, also none hidden in a function-level import;
* no ``_private`` name of one module used in another;
* no file under src/ over 400 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SERVICES = ("mlflow", "kfp", "optuna", "boto3", "botocore", "sqlalchemy", "psycopg2")

# layer of each top-level part of fcpts; a module may import its own layer and lower ones
LAYERS = {
    "core": 0,  # fcpts.<module> not listed below: the algorithm, tasks, models, reports
    "storage": 1,
    "tracking": 1,
    "sources": 2,
    "steps": 3,
    "sweep": 4,
    "cli": 5,
}
NOT_CORE = {"storage", "tracking", "sources", "steps", "sweep", "cli"}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "fcpts").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    for folder in ("components", "pipelines"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = modules()


def part(module: str) -> str:
    """The layer name of a module: its first part below fcpts (or components/pipelines)."""
    bits = module.split(".")
    if bits[0] != "fcpts":
        return bits[0]
    sub = bits[1] if len(bits) > 1 else ""
    return sub if sub in NOT_CORE else "core"


def _runtime_nodes(tree: ast.AST):
    """Every node of the module except those under ``if TYPE_CHECKING:`` (annotations
    only: never imported when the code runs)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from _runtime_nodes(node)


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the module,
    function-level ones included, type-checking-only ones not; relative imports resolved."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import submodule` is an import of the submodule
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            for n in subs:
                out.append((f"{target}.{n}", [], node.lineno))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((target, rest, node.lineno))
    return out


def test_the_core_imports_no_service_library_and_nothing_above_it():
    bad = []
    for module in MODULES:
        if not module.startswith("fcpts") or part(module) != "core":
            continue
        for target, _, line in imports(module):
            top = target.split(".")[0]
            if top in SERVICES or (target.startswith("fcpts") and part(target) != "core"):
                bad.append(f"{module}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_imports_point_one_way():
    bad = []
    for module in MODULES:
        if not module.startswith("fcpts"):
            continue
        mine = LAYERS[part(module)]
        for target, _, line in imports(module):
            if target.startswith("fcpts") and target in MODULES and LAYERS[part(target)] > mine:
                bad.append(f"{module}:{line} ({part(module)}) imports {target} ({part(target)})")
    assert not bad, "\n".join(bad)


def test_the_library_never_imports_cli_components_or_pipelines():
    bad = [
        f"{m}:{line} imports {t}"
        for m in MODULES
        if m.startswith("fcpts") and part(m) != "cli"
        for t, _, line in imports(m)
        if t.split(".")[0] in ("components", "pipelines") or t.startswith("fcpts.cli")
    ]
    assert not bad, "\n".join(bad)


def _cycles() -> list[list[str]]:
    graph = {
        m: {t for t, _, _ in imports(m) if t in MODULES and t != m}
        for m in MODULES
        if m.startswith("fcpts")
    }
    # a package's __init__ re-exporting its submodules is no cycle of ideas: drop the
    # edges from a package to its own submodules
    for m, targets in graph.items():
        if MODULES[m].name == "__init__.py":
            targets -= {t for t in targets if t.startswith(m + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycle_even_through_function_level_imports():
    cycles = _cycles()
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_is_used_across_modules():
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for target, names, line in imports(module):
            if not target.startswith(("fcpts", "components", "pipelines")):
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{module}:{line} imports {target}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    aliases[alias.asname or alias.name] = alias.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    aliases[(alias.asname or alias.name).split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                target = aliases[node.value.id]
                if any(m.endswith(target) for m in MODULES) and node.value.id != "self":
                    bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "path", sorted((SRC / "fcpts").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC))
)
def test_no_source_file_over_400_lines(path):
    assert len(path.read_text().splitlines()) <= 400
