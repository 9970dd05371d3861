"""Package layering: imports flow one way, webapi/workers -> aios, never back.

``aios`` is the core every process shares; it reaches ``aios api`` and ``aios worker`` only through
entry points, so a worker image need not ship the web layer and the core never depends on either.
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
