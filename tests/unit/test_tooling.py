"""The developer's front door: every Makefile target does something, and CI lints before it tests."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT

MAKEFILE = REPO_ROOT / "Makefile"


def makefile_recipes() -> dict[str, list[str]]:
    """Target → its recipe lines, for every target the Makefile declares .PHONY."""
    lines = MAKEFILE.read_text().splitlines()
    phony = {name for line in lines if line.startswith(".PHONY:") for name in line.split(":", 1)[1].split()}
    recipes: dict[str, list[str]] = {}
    current = None
    for line in lines:
        rule = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", line)
        if rule:
            current = rule.group(1)
            recipes.setdefault(current, [])
        elif line.startswith("\t") and current is not None:
            recipes[current].append(line.strip())
        elif line and not line.startswith("#"):
            current = None
    return {name: recipes.get(name, []) for name in phony}


def test_every_makefile_target_has_a_recipe():
    recipes = makefile_recipes()
    assert {"install", "run", "test", "test-unit", "test-integration", "lint", "format", "bench"} <= set(recipes)
    empty = sorted(name for name, lines in recipes.items() if not lines)
    assert not empty, f"Makefile targets without a recipe: {empty}"


def test_make_lint_runs_ruff_the_format_check_and_mypy():
    lint = " ; ".join(makefile_recipes()["lint"])
    assert "ruff check" in lint and "ruff format --check" in lint and "mypy" in lint, lint


def test_ci_lints_before_it_tests():
    commands = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make lint" in commands and "make test" in commands
    assert commands.index("make lint") < commands.index("make test")
