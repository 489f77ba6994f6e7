"""The package as static tools see it: every internal import resolves to a file, no import circle between
modules or between the package's parts, no use of another part's private names, small modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "anomaly_framework"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 400


def module_files(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (``__init__`` names its package)."""
    modules = {}
    for path in package_dir.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(package_dir).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def internal_imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) of every import of the package in a file, at any depth
    (imports inside functions count: they are edges all the same)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == PACKAGE]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == PACKAGE:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in modules
                             else (node.module, alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((f"<relative import in {path.name}>", None, node.lineno))
    return found


def defined_names(path: Path) -> set[str]:
    """Top-level names a module defines or imports (what ``from module import name`` can take)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def part(module: str) -> str:
    """The part of the package a module belongs to: its sub-package, or itself for a top-level module."""
    return ".".join(module.split(".")[:2])


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        graph[name] = {target for target, _, _ in internal_imports(path, modules) if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (a list of nodes, first repeated last), or None."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def part_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    parts: dict[str, set[str]] = {}
    for source, targets in graph.items():
        # A package's __init__ importing its own modules is the package itself, not an edge.
        parts.setdefault(part(source), set()).update(part(t) for t in targets if part(t) != part(source))
    return parts


def test_every_internal_import_resolves_to_a_file_or_a_name_in_one():
    modules = module_files()
    unresolved = []
    for name, path in modules.items():
        for target, imported, line in internal_imports(path, modules):
            if target not in modules:
                unresolved.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {target}")
            elif imported is not None and imported not in defined_names(modules[target]):
                unresolved.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {imported} from {target}")
    assert not unresolved, "\n".join(unresolved)


def test_no_import_circle_between_modules_nor_between_parts():
    graph = import_graph(module_files())
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    parts = part_graph(graph)
    assert find_cycle(parts) is None, " -> ".join(find_cycle(parts))


def test_cycle_finder_finds_a_planted_circle():
    """The check above can fail: a circle through three parts is found, and a chain is not."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    graph = {"anomaly_framework.models.x": {"anomaly_framework.metrics.y"},
             "anomaly_framework.metrics.y": {"anomaly_framework.models.z"}, "anomaly_framework.models.z": set()}
    assert find_cycle(graph) is None and find_cycle(part_graph(graph)) is not None


def test_no_part_uses_another_parts_private_names():
    modules = module_files()
    private = [f"{path.relative_to(PACKAGE_DIR.parent)}:{line} takes {imported} from {target}"
               for name, path in modules.items()
               for target, imported, line in internal_imports(path, modules)
               if imported and imported.startswith("_") and part(target) != part(name)]
    assert not private, "\n".join(private)


def test_design_tree_is_there_and_the_root_holds_no_framework_module():
    for name in ("main.py", "config.py", "utils.py", "registry.py", "backbones", "dataloaders", "models",
                 "modelers", "trainers", "metrics"):
        assert (PACKAGE_DIR / name).exists(), name
    root = PACKAGE_DIR.parent
    assert sorted(path.name for path in root.glob("*.py")) == ["main.py"]  # the README's launcher only
    assert "__path__" not in (PACKAGE_DIR / "__init__.py").read_text()


@pytest.mark.parametrize("path", sorted(PACKAGE_DIR.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_module_is_at_most_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines"
