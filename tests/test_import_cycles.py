"""No import cycles among qeval's modules.

A cycle hides a layering mistake: two modules that need each other are one module in two
files, and the usual way to make such a pair import at all is a function-level import, which
then fails (or half-initialises a module) only on the code path that runs it.  This test reads
every module under ``qeval/`` with :mod:`ast` (it imports nothing), takes every qeval-internal
import in it, at module level and inside functions alike, and fails listing every strongly
connected component of the import graph with the import lines that close it.

Resolution: ``import a.b`` and ``from a.b import c`` are edges to ``a.b``, or to ``a.b.c``
when ``c`` is itself a module (``from qeval.eval import dialogue``); relative imports are
resolved against the importing module's package.  Importing a submodule also runs its
parents' ``__init__``, but that is not counted as an edge (every package would otherwise sit
in a cycle with the submodules its ``__init__`` re-exports).  Imports under
``if TYPE_CHECKING:`` never run and are left out.  The task plugin folder ``qeval/tasks/`` is
an implicit namespace package: its plugin files are loaded by path, but they and their
helper modules are read like every other module, so a helper that imports a plugin (or the
evaluation code that imports a helper) cannot close a cycle unnoticed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import qeval

PACKAGE_DIR = Path(qeval.__file__).resolve().parent


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    file: str  # relative to the package's parent folder: qeval/eval/registry.py
    line: int
    in_function: bool

    def describe(self) -> str:
        where = "function-level" if self.in_function else "module-level"
        return f"{self.source} -> {self.target} ({self.file}:{self.line}, {where})"


def module_names(root: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted name -> file of every module under the package (``__init__`` files name their package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("qeval", *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if all(p.isidentifier() for p in parts):
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """(node, inside a function) for every import statement that can run."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack += [(c, in_function) for c in child.orelse]
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack.append((child, nested))


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a qeval module (``qeval.x.y.attr`` -> ``qeval.x.y``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    """Every qeval-internal import of every module, resolved to the module it names."""
    edges = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        file = path.relative_to(path.parents[len(name.split(".")) - (0 if is_package else 1)]).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_function in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module or ""
                targets = [f"{pkg}.{alias.name}" if f"{pkg}.{alias.name}" in modules else pkg for alias in node.names]
            for target in targets:
                resolved = _known(target, modules) if target.split(".")[0] == "qeval" else None
                if resolved is not None and resolved != name:
                    edges.append(Edge(name, resolved, file, node.lineno, in_function))
    return edges


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module, each sorted."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        succ[e.source].append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(succ[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def cycle_report(modules: dict[str, Path]) -> list[str]:
    """One paragraph per cycle: its modules and the imports between them."""
    edges = import_edges(modules)
    paragraphs = []
    for component in strongly_connected(sorted(modules), edges):
        members = set(component)
        inside = sorted(
            {e for e in edges if e.source in members and e.target in members}, key=lambda e: (e.source, e.line)
        )
        paragraphs.append(f"cycle among {', '.join(component)}:\n" + "\n".join(f"    {e.describe()}" for e in inside))
    return paragraphs


def test_the_resolver_sees_function_level_relative_and_submodule_imports(tmp_path):
    """The walker itself, on a made-up package: a cycle closed by a function-level import, a
    ``from pkg import submodule`` edge, a relative import, and a TYPE_CHECKING import left out."""
    pkg = tmp_path / "qeval"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from qeval.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from qeval import a\n")
    (pkg / "sub" / "c.py").write_text(
        "from . import b\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import qeval.d\n"
    )
    (pkg / "d.py").write_text("import qeval.sub.c\n")
    modules = module_names(pkg)
    edges = {(e.source, e.target, e.in_function) for e in import_edges(modules)}
    assert ("qeval.a", "qeval.sub.b", False) in edges and ("qeval.sub.b", "qeval.a", True) in edges
    assert ("qeval.sub.c", "qeval.sub.b", False) in edges and ("qeval.d", "qeval.sub.c", False) in edges
    assert not any(s == "qeval.sub.c" and t == "qeval.d" for s, t, _ in edges)
    assert strongly_connected(sorted(modules), import_edges(modules)) == [["qeval.a", "qeval.sub.b"]]


def test_qeval_has_no_import_cycles():
    cycles = cycle_report(module_names())
    assert not cycles, f"{len(cycles)} import cycle(s) in qeval:\n" + "\n".join(cycles)
