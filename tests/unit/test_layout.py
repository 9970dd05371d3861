"""Package layering and layout: imports flow one way, webapi/workers -> aios, never back.

``aios`` is the core every process shares; it reaches ``aios api`` and ``aios worker`` only through
entry points, so a worker image need not ship the web layer and the core never depends on either.
``aios_client`` imports nothing of the server, so it can ship alone. Inside the core, every package
says what it owns in its ``__init__`` docstring, and no top-level module grows past 600 lines (one that
needs a table of contents wants to be a package).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
UPPER_LAYERS = {"webapi", "workers"}


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports, anywhere in the file)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and _is_dynamic_import(node) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                roots.add(first.value.split(".")[0])
    return roots


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__")


CORE_MODULES = sorted((REPO_ROOT / "aios").rglob("*.py"))


def test_the_core_package_has_modules_to_check():
    # Given the aios package / Then the scan really finds its modules (the test below is not vacuous)
    names = {path.name for path in CORE_MODULES}
    assert {"config.py", "states.py", "cli.py", "create.py"} <= names


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_core_module_imports_the_web_or_worker_layer(path):
    # Given a module of the core package
    # When its imports are read
    roots = imported_roots(path)
    # Then none of them is webapi or workers
    assert not roots & UPPER_LAYERS, f"{path.relative_to(REPO_ROOT)} imports {sorted(roots & UPPER_LAYERS)}"


# --------------------------------------------------------------------------- the client stands alone

SERVER_SIDE = {"aios", "webapi", "workers"}
CLIENT_MODULES = sorted((REPO_ROOT / "aios_client").rglob("*.py"))


@pytest.mark.parametrize("path", CLIENT_MODULES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_the_client_imports_nothing_of_the_server(path):
    # Given a module of the client package (the SDK and the client commands)
    # When its imports are read
    roots = imported_roots(path)
    # Then none of them is aios, webapi or workers
    assert not roots & SERVER_SIDE, f"{path.relative_to(REPO_ROOT)} imports {sorted(roots & SERVER_SIDE)}"


def test_the_client_package_has_modules_to_check():
    assert {"__init__.py", "client.py"} <= {path.name for path in CLIENT_MODULES}


# --------------------------------------------------------------------------- packages and module sizes

#: Directories of Python files that are not packages: Alembic's scripts.
NOT_PACKAGES = {"migrations", "__pycache__"}
MAX_TOP_LEVEL_LINES = 600


def package_dirs(*roots: str, base: Path = REPO_ROOT) -> list[Path]:
    """Every directory under ``roots`` that holds Python files (Alembic's migrations aside)."""
    found = set()
    for root in roots:
        for path in (base / root).rglob("*.py"):
            relative = path.parent.relative_to(base)
            if not NOT_PACKAGES & set(relative.parts):
                found.add(path.parent)
    return sorted(found)


PACKAGE_DIRS = package_dirs("aios", "aios_client")


def test_the_package_scan_finds_the_core_packages():
    names = {str(path.relative_to(REPO_ROOT)) for path in PACKAGE_DIRS}
    assert {"aios", "aios/tasks", "aios/agents", "aios_client"} <= names
    assert not any("migrations" in name for name in names)


def test_every_package_has_a_docstring():
    # Given every directory of Python files under aios/ and aios_client/
    # When each one's __init__.py is read
    problems = []
    for directory in PACKAGE_DIRS:
        init = directory / "__init__.py"
        name = str(directory.relative_to(REPO_ROOT))
        if not init.is_file():
            problems.append(f"{name} has no __init__.py")
        elif not (ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or "").strip():
            problems.append(f"{name}/__init__.py has no docstring saying what the package owns")
    # Then each is a package whose docstring says what it owns
    assert not problems, "; ".join(problems)


def test_no_top_level_core_module_is_over_600_lines():
    # Given the modules directly in aios/ (the packages below have their own parts)
    sizes = {
        path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in (REPO_ROOT / "aios").glob("*.py")
    }
    assert "config.py" in sizes
    # Then none has more than 600 lines
    over = sorted(f"aios/{name} ({lines} lines)" for name, lines in sizes.items() if lines > MAX_TOP_LEVEL_LINES)
    assert not over, f"top-level core modules over {MAX_TOP_LEVEL_LINES} lines (make them packages): {', '.join(over)}"
