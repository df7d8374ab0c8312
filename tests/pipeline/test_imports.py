"""The package's modules import each other without circles, counting the imports inside functions.

Every module of `iepjax` is parsed with `ast` (nothing is imported); an edge a -> b is any
`import` or `from ... import` in a, at any depth, that names b or something in b. A circle
(a -> b -> ... -> a) fails the test with its modules and the lines of its imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "iepjax"


def module_name(path: Path, root: Path = ROOT) -> str:
    """iepjax/data/mvtec.py -> iepjax.data.mvtec; iepjax/data/__init__.py -> iepjax.data."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """{module name: file} of every module of the package under `root`."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _target(name: str, known: dict[str, Path]) -> str | None:
    """The package module `name` refers to: itself, else the longest known prefix (a name in a module)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(known: dict[str, Path]) -> dict[str, dict[str, int]]:
    """{module: {imported package module: line of the first such import}}, nested imports included."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        edges: dict[str, int] = {}
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..data import y
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                wanted = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for w in wanted:
                t = _target(w, known)
                if t is not None and t != name:
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle a -> ... -> a per strongly connected group of modules (Tarjan), as module lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_circle(sorted(g)[0], set(g), graph) for g in groups]


def _circle(start: str, group: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest path start -> ... -> start inside `group` (breadth first)."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in group and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("unreachable: a strongly connected group has a circle")


def describe(circle: list[str], graph: dict[str, dict[str, int]], known: dict[str, Path]) -> str:
    steps = [f"{known[a].relative_to(known[a].parents[a.count('.')])}:{graph[a][b]} imports {b}" for a, b in zip(circle, circle[1:])]
    return " -> ".join(circle) + "\n    " + "\n    ".join(steps)


def test_the_package_has_no_import_cycles():
    known = modules()
    assert {"iepjax", "iepjax.config", "iepjax.pipelines.project", "iepjax.data.preprocess"} <= set(known)
    graph = import_graph(known)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph, known) for c in found)


def test_the_check_sees_nested_imports_and_names_the_cycle(tmp_path):
    """The check itself: an import inside a function closes a circle, and the message names it."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text("import os\nfrom iepjax.sub.b import thing\n")
    (pkg / "sub" / "b.py").write_text("def thing():\n    from ..a import x\n    return x\n")
    known = modules(tmp_path)
    graph = import_graph(known)
    assert graph["iepjax.a"] == {"iepjax.sub.b": 2} and graph["iepjax.sub.b"] == {"iepjax.a": 2}
    assert cycles(graph) == [["iepjax.a", "iepjax.sub.b", "iepjax.a"]]


def test_no_public_name_is_shadowed_by_a_submodule():
    """A lazily exported name that is also a submodule's name turns into the module once the
    submodule is imported (the import system sets the package attribute): `from iepjax import X`
    would then depend on import order."""
    import iepjax
    submodules = {name.split(".")[1] for name in modules() if name.count(".") >= 1}
    assert not set(iepjax.__all__) & submodules, set(iepjax.__all__) & submodules
    import iepjax.energy  # noqa: F401  (the submodule most like a public name)
    assert all(not isinstance(getattr(iepjax, n), type(iepjax)) for n in iepjax.__all__)
