"""Import layering of ``ursa_engine`` (STYLE, "The house"): no import cycle among its modules and
no import of ``ursa_engine.benchmarks`` (benchmarks depend on the engine, never the reverse).

Static: every module is parsed with :mod:`ast`, nothing is imported. Imports inside functions
(lazy imports) are edges like the top-level ones: a cycle that closes only at call time is still a
cycle a reader has to untangle. ``importlib.import_module("a.b")`` with a literal name counts too;
names built at run time (backend tables, f-strings) cannot be seen. Imports under
``if TYPE_CHECKING:`` never run and are skipped. An import names the most specific module it loads
(``from . import checkpoint`` -> ``ursa_engine.checkpoint``, ``from .vae import load_tokenizer`` ->
``ursa_engine.vae``); a submodule's implicit import of its parent package is not an edge.

``python tests/test_layering.py`` prints the lazy edges and any cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ursa_engine"
FORBIDDEN = ("ursa_engine.benchmarks", "benchmarks")  # packages ursa_engine must not import
# Installed as ``ursa_engine.<name>`` (setup.py): a bare ``import <name>`` would find whatever
# unrelated package of that name the user has installed.
UNQUALIFIED = ("triton_kernels", "benchmarks")
# their repository folders sit beside the package, not in it: imports of them leave the graph
MAPPED = tuple(f"{PACKAGE}.{name}" for name in UNQUALIFIED)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function body
    file: str = ""

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.file}:{self.line}, {'lazy' if self.lazy else 'top-level'})"


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` of the package (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, known: dict[str, Path]) -> str:
    """The most specific known module of a dotted name (``ursa_engine.vae.X`` -> ``ursa_engine.vae``)."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(name: str, path: Path, known: dict[str, Path], root: Path = ROOT) -> list[Edge]:
    """Every import of one module (any target, inside the package or not)."""
    file = path.relative_to(root).as_posix()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges: list[Edge] = []

    def add(target: str, node: ast.AST, lazy: bool) -> None:
        if target.split(".")[0] == PACKAGE and not target.startswith(MAPPED):
            target = _resolve(target, known)
        edge = Edge(name, target, node.lineno, lazy, file)
        if target != name and edge not in edges:  # one edge per statement (from .x import a, b)
            edges.append(edge)

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, lazy)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node, lazy)
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Attribute, ast.Name))
              and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            add(node.args[0].value, node, lazy)
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
    return edges


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> list[Edge]:
    known = modules(root, package)
    return [e for name, path in known.items() for e in imports(name, path, known, root)]


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted; sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(found)


def _internal(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if e.target.split(".")[0] == PACKAGE]


def _describe(component: list[str], edges: list[Edge]) -> str:
    inside = set(component)
    return "\n".join(f"  {e}" for e in edges if e.source in inside and e.target in inside)


def test_import_graph_sees_relative_lazy_and_package_imports():
    """The parser is not vacuous: known edges of each kind are found."""
    edges = {(e.source, e.target, e.lazy) for e in import_graph()}
    assert ("ursa_engine.model", "ursa_engine.checkpoint", False) in edges  # from . import checkpoint
    assert ("ursa_engine.checkpoint", "ursa_engine.config", False) in edges  # from .config import ModelConfig
    assert ("ursa_engine.engine", "ursa_engine.pretrained", True) in edges  # inside Engine.from_pretrained
    assert ("ursa_engine.pretrained", "ursa_engine.compat", True) in edges  # inside load_engine
    assert ("ursa_engine.pretrained", "ursa_engine.vae", True) in edges  # from .vae import load_tokenizer
    assert ("ursa_engine.vae.loading", "ursa_engine.checkpoint", False) in edges  # from ..checkpoint import


def test_cycle_finder_reports_a_lazy_cycle():
    a_b = Edge("ursa_engine.a", "ursa_engine.b", 1, False)
    b_a = Edge("ursa_engine.b", "ursa_engine.a", 9, True)
    c = Edge("ursa_engine.b", "ursa_engine.c", 2, False)
    assert cycles([a_b, c]) == []
    assert cycles([a_b, b_a, c]) == [["ursa_engine.a", "ursa_engine.b"]]


def test_ursa_engine_has_no_import_cycle():
    """No two ursa_engine modules import each other, directly or through others, top-level or lazily."""
    edges = _internal(import_graph())
    found = cycles(edges)
    assert not found, "import cycles in ursa_engine:\n" + "\n".join(
        f"{' <-> '.join(c)}:\n{_describe(c, edges)}" for c in found)


# The command line is the top layer: ``ursa-engine bench`` dispatches (lazily) to the benchmark
# tools, which depend on the engine like any user; no other module may reach them.
BENCH_FRONT_DOOR = "ursa_engine.cli"


def _forbidden(target: str) -> bool:
    return any(target == f or target.startswith(f + ".") for f in FORBIDDEN)


def test_no_unqualified_import_of_our_mapped_packages():
    """``triton_kernels`` and ``benchmarks`` are imported as ``ursa_engine.triton_kernels`` /
    ``ursa_engine.benchmarks`` everywhere (their own modules use relative imports)."""
    bad = []
    for folder in (PACKAGE, *UNQUALIFIED, "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for e in imports(path.stem, path, {}):
                if e.target.split(".")[0] in UNQUALIFIED:
                    bad.append(f"  {path.relative_to(ROOT)}:{e.line} imports {e.target}")
    assert not bad, "unqualified imports (use ursa_engine.<name>):\n" + "\n".join(bad)


def test_ursa_engine_does_not_import_benchmarks():
    bad = [e for e in import_graph() if _forbidden(e.target) and not (e.source == BENCH_FRONT_DOOR and e.lazy)]
    assert not bad, "ursa_engine imports benchmarks (they must depend on it, not the reverse):\n" + "\n".join(
        f"  {e}" for e in bad)


if __name__ == "__main__":
    all_edges = import_graph()
    internal = _internal(all_edges)
    print(f"{len(modules())} modules, {len(internal)} imports inside {PACKAGE}; lazy ones:")
    for e in internal:
        if e.lazy:
            print(f"  {e}")
    for c in cycles(internal):
        print(f"CYCLE {' <-> '.join(c)}:\n{_describe(c, internal)}")
    for e in all_edges:
        if _forbidden(e.target):
            print(f"FORBIDDEN {e}")
