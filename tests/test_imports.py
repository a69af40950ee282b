"""The package's import structure, read statically from the source with `ast` (nothing is imported): no module of
pockengine imports itself back through others, and the library never imports the repository's benchmark (`bench`,
which is not in the wheel).

Every import statement counts, at module level and inside functions alike (a function-level import is still a
dependency; it only runs later), except those under `if TYPE_CHECKING:`, which never run. An edge goes to each
pockengine module an import names (`from pockengine.ir.graph import Node` and `from .ir import graph` in
pockengine.trainer: pockengine.ir.graph; `from pockengine import Scheme`: pockengine) and to the packages above it,
whose __init__ runs first (pockengine.ir), but not to the importer's own packages, whose __init__ has started before
it runs (`from pockengine.kernels import native` in pockengine.kernels.masks points at pockengine.kernels.native
only).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pockengine"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of the tree, outside `if TYPE_CHECKING:` blocks."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            out.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of `from <...> import`, relative imports resolved against `module`."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _with_packages(name: str) -> set[str]:
    """`a.b.c` -> {a, a.b, a.b.c}: importing a module runs the __init__ of every package above it."""
    parts = name.split(".")
    return {".".join(parts[:k]) for k in range(1, len(parts) + 1)}


def dependencies(path: Path, module: str, modules: set[str]) -> set[str]:
    """What importing `path` (the module `module`) runs of `modules`: each module an import names (`import M`;
    `from M import name`; `from M import submodule` names the submodule), and the packages above those, except the
    packages above `module` itself, whose __init__ has started before it runs."""
    named: set[str] = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            named.update(alias.name for alias in node.names)
            continue
        source = _absolute(node, module, path.name == "__init__.py")
        submodules = {f"{source}.{alias.name}" for alias in node.names} & modules
        named |= submodules
        if len(submodules) < len(node.names):  # a name defined in `source` itself: its __init__ must have run
            named.add(source)
    above = set().union(*(_with_packages(n) for n in named)) - named if named else set()
    return ((named | (above - _with_packages(module))) & modules) - {module}


def import_graph() -> dict[str, set[str]]:
    """module -> the pockengine modules that importing it runs (see `dependencies`)."""
    modules = package_modules()
    return {name: dependencies(path, name, set(modules)) for name, path in modules.items()}


def tangles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): modules each on a cycle with the others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return components


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first), as the modules in order."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(component)}: not a strongly connected component")


def test_the_graph_sees_every_kind_of_import():
    """The reader itself: relative, function-level and `from package import submodule` imports are edges."""
    graph = import_graph()
    assert len(graph) > 30 and "pockengine.trainer" in graph and "pockengine" in graph
    assert "pockengine.errors" in graph["pockengine"]  # `from pockengine.errors import ...` in __init__ (the rest
    # of its names are imported lazily, by name, on first use)
    # `import pockengine as pe`, and `from pockengine.data import ...` inside a function
    assert graph["pockengine.cli"] >= {"pockengine", "pockengine.data", "pockengine.models"}
    assert graph["pockengine.kernels.masks"] == {"pockengine.kernels.native"}  # its own package is no edge
    assert {"pockengine.ir", "pockengine.ir.graph"} <= graph["pockengine.trainer"]  # a package above an import
    code = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
                     "def f():\n    from .c import d\n")
    assert [ast.unparse(n) for n in _imports(code)] == ["from typing import TYPE_CHECKING", "import b",
                                                         "from .c import d"]
    relative = ast.parse("from ..ir import graph").body[0]
    assert _absolute(relative, "pockengine.passes.inplace", is_package=False) == "pockengine.ir"
    assert _absolute(relative, "pockengine.passes", is_package=True) == "pockengine.ir"
    assert _absolute(ast.parse("from . import x").body[0], "pockengine.passes", is_package=True) == "pockengine.passes"


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    found = tangles(graph)
    cycles = [f"{' -> '.join(cycle_in(graph, c))} (all modules of the tangle: {', '.join(sorted(c))})" for c in found]
    assert not cycles, "import cycles (each: a module, what it imports, ..., back to it):\n" + "\n".join(cycles)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set(), "f": {"f"}}
    assert tangles(graph) == [{"a", "b", "c"}]
    assert cycle_in(graph, {"a", "b", "c"}) == ["a", "b", "c", "a"]


def test_the_library_does_not_import_the_benchmark():
    def top_level_names(path: Path) -> set[str]:  # relative imports stay inside the package
        nodes = _imports(ast.parse(path.read_text(), str(path)))
        return ({alias.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for alias in n.names}
                | {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0})

    offenders = sorted(name for name, path in package_modules().items() if "bench" in top_level_names(path))
    assert not offenders, f"pockengine modules importing the repository's benchmark (not in the wheel): {offenders}"
