"""No import cycles among the project's modules, counting the imports inside function bodies.

A cycle held apart only by an import moved into a function still ties its modules into one knot:
none can be read, tested or moved without the others, and the order in which a process happens to
import them decides whether it starts. The graph is read from the source with :mod:`ast`, so what
is checked is what the code says, not what one process happened to import.

An edge ``a -> b`` means that running ``a`` may import ``b``:

* ``import x.y.z`` and ``from x.y import z`` anywhere in ``a`` (module level or inside a function),
  and ``importlib.import_module("x.y")`` / ``__import__("x.y")`` with a literal name;
* importing ``x.y.z`` also runs the ``__init__`` of the packages ``x`` and ``x.y``: those are edges
  too, except for a package ``a`` itself belongs to (Python has started it before ``a`` runs) unless
  ``a`` takes a name from that package's ``__init__`` (``from x.y import name`` with ``name`` not a
  submodule);
* imports under ``if TYPE_CHECKING:`` are not edges: they never run.

Migrations (``aios/migrations``) are scripts Alembic loads, not modules the code imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("aios", "aios_client", "webapi", "workers")
EXCLUDED_DIRS = {"migrations", "__pycache__"}


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name → file, for every module of ``packages`` under ``root`` (a package is its
    ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            if EXCLUDED_DIRS & set(relative.parts):
                continue
            parts = relative.with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` → ``["a", "a.b"]``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (their ``else`` runs)."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _dynamic_import(node: ast.Call) -> str | None:
    """The literal module name of ``importlib.import_module("x")`` or ``__import__("x")``, else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _absolute(importer: str, is_package: bool, module: str | None, level: int) -> str:
    """The absolute name a (possibly relative) ``from ... import`` refers to."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def import_graph(root: Path = REPO_ROOT, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module → the project modules it may import when it runs (see the module docstring)."""
    modules = project_modules(root, packages)
    return {name: _imports_of(name, path, modules) for name, path in modules.items()}


def _imports_of(importer: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``importer`` (at ``path``) may import when it runs."""
    is_package = path.name == "__init__.py"
    own_packages = {importer, *_ancestors(importer)}
    edges: set[str] = set()

    def known(name: str) -> str | None:
        """``name`` or its longest prefix that is a project module (``aios.x.Class`` → ``aios.x``)."""
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def add(target: str | None) -> None:
        """An edge to ``target`` and to the packages whose ``__init__`` importing it runs."""
        if target is None or target == importer:
            return
        edges.add(target)
        edges.update(a for a in _ancestors(target) if a in modules and a not in own_packages)

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(known(alias.name))
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(importer, is_package, node.module, node.level)
            if known(source) is None:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:  # its package's __init__ too, by add()
                    add(submodule)
                else:  # a name defined in ``source`` itself: its code must have run
                    add(known(source))
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)):
            add(known(name))
    return edges


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module (iterative: no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def _shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the first module of ``component``, as ``[a, b, ..., a]``."""
    members, start = set(component), component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each knot of modules that import each other, as one cycle through it and the knot's members."""
    described = []
    for component in _strongly_connected(graph):
        cycle = " -> ".join(_shortest_cycle(graph, component))
        others = sorted(set(component) - set(cycle.split(" -> ")))
        described.append(cycle + (f" (same knot: {', '.join(others)})" if others else ""))
    return described


# --------------------------------------------------------------------------- the rule


def test_no_import_cycles_among_the_projects_modules():
    # Given the import graph of aios, aios_client, webapi and workers (function-level imports too)
    graph = import_graph()
    # When its cycles are looked for
    cycles = import_cycles(graph)
    # Then there are none
    assert not cycles, "import cycles (counting imports inside functions):\n  " + "\n  ".join(cycles)


def test_the_graph_sees_the_projects_modules_and_their_imports():
    # Given the graph of the real source / Then it is not vacuous: known modules and edges are in it
    graph = import_graph()
    assert {"aios.models", "aios.tasks.create", "webapi.app", "workers.runner", "aios_client.client"} <= set(graph)
    assert "aios.models" in graph["aios.tasks.create"]
    assert not any(name.startswith("aios.migrations") for name in graph)


# --------------------------------------------------------------------------- the reader, on a made-up tree


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_an_import_inside_a_function_closes_a_cycle(tmp_path):
    # Given a module-level import one way and an import inside a function the other way
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/db.py": "def guard():\n    from pkg.migrate import head\n    return head()\n",
            "pkg/migrate.py": "from pkg.db import guard\n\ndef head():\n    return 1\n",
        },
    )
    # Then the cycle is found and named module by module
    assert import_cycles(import_graph(root, ["pkg"])) == ["pkg.db -> pkg.migrate -> pkg.db"]


def test_importing_a_submodule_runs_its_packages_init(tmp_path):
    # Given a package whose __init__ re-exports a module that imports the models, which import
    # another module of that package: the models never name the __init__, yet running them runs it
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/models.py": "from pkg.tasks.states import TaskState\n",
            "pkg/tasks/__init__.py": "from pkg.tasks.create import create\n",
            "pkg/tasks/states.py": "TaskState = str\n",
            "pkg/tasks/create.py": "import pkg.models\n\ndef create(): ...\n",
        },
    )
    graph = import_graph(root, ["pkg"])
    # Then the edge to the package's __init__ counts, and closes the cycle through it
    assert "pkg.tasks" in graph["pkg.models"]
    assert import_cycles(graph) == ["pkg.models -> pkg.tasks -> pkg.tasks.create -> pkg.models"]


def test_a_module_does_not_depend_on_its_own_packages_init_unless_it_takes_a_name_from_it(tmp_path):
    # Given a package whose __init__ imports two of its modules, one of which imports the other by
    # its full name (Python has started the package before either runs), and a third that takes a
    # name from the __init__ itself
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\nfrom pkg.b import B\n",
            "pkg/a.py": "from pkg.b import B\nA = B\n",
            "pkg/b.py": "import importlib\n\nB = 1\n",
            "pkg/c.py": "from pkg import A\n",
        },
    )
    graph = import_graph(root, ["pkg"])
    # Then a -> b is an edge but a -> pkg is not; c -> pkg is
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.c"] == {"pkg"}
    assert import_cycles(graph) == []


def test_literal_dynamic_imports_count_and_type_checking_imports_do_not(tmp_path):
    # Given a registry that loads a plugin module by name, and a module importing another for types only
    root = _tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/registry.py": "import importlib\n\ndef load():\n    importlib.import_module('pkg.plugin')\n",
            "pkg/plugin.py": "from pkg.registry import load\n",
            "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.hints import H\n",
            "pkg/hints.py": "from pkg.typed import TYPE_CHECKING\n",
        },
    )
    # Then only the dynamic import closes a cycle
    assert import_cycles(import_graph(root, ["pkg"])) == ["pkg.plugin -> pkg.registry -> pkg.plugin"]
