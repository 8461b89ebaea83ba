"""The package's imports run one way: no module imports, directly or through others, a module that
imports it back (lazy imports inside functions included), and no layer imports one above it."""

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "ctvlp"

# (importer prefix, imported prefix) pairs that must not occur: the layers of the pipeline
FORBIDDEN = [
    ("ctvlp.model", "ctvlp.training"), ("ctvlp.model", "ctvlp.evaluation"), ("ctvlp.model", "ctvlp.cli"),
    ("ctvlp.evaluation", "ctvlp.training"), ("ctvlp.imaging", "ctvlp.model"), ("ctvlp.imaging", "ctvlp.training"),
    ("ctvlp.imaging", "ctvlp.evaluation"), ("ctvlp.imaging", "ctvlp.reports"), ("ctvlp.cohort", "ctvlp.model"),
    ("ctvlp.cohort", "ctvlp.training"), ("ctvlp.cohort", "ctvlp.evaluation"), ("ctvlp.reports", "ctvlp.model"),
    ("ctvlp.reports", "ctvlp.imaging"), ("ctvlp.workspace", "ctvlp."), ("ctvlp.catalog", "ctvlp."),
    ("ctvlp.imaging.io", "ctvlp.imaging.checks"), ("ctvlp.imaging.io", "ctvlp.imaging.segment"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules) -> set[str]:
    """Every ctvlp module ``path`` imports, anywhere in the file (also inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ctvlp")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("ctvlp"):
                continue
            for alias in node.names:  # "from . import catalog" imports the module ctvlp.catalog
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # an edge to every module actually imported (a name imported from a module is not a module)
    return {name: {m for m in imports_of(path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def test_the_graph_is_read(graph):
    assert "ctvlp.training.phases" in graph and "ctvlp.model.losses" in graph["ctvlp.training.phases"]
    assert "ctvlp.model.io" in graph["ctvlp.evaluation.zeroshot"]
    assert len(graph) > 40


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path (first node repeated at the end), or None. Depth-first
    search: an edge back to a node on the current path closes a cycle."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downwards(graph):
    bad = [(a, b) for a, targets in graph.items() for b in targets
           for low, high in FORBIDDEN if a.startswith(low) and b.startswith(high) and not b.startswith(low)]
    assert not bad, bad


def test_a_cycle_would_be_found():
    """The check can fail: cycles of two and three modules are reported, a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == ["w", "x", "y", "z", "x"][1:]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
