"""``aios`` is one click group for every command, and its client half is a package of its own.

The server commands (here and from the ``aios.commands`` entry points) and the client commands
(:mod:`aios_client.commands`) are one tree: ``aios --help`` lists them all. The client package
imports nothing of the server, so it can ship alone.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SERVER_SIDE = {"aios", "webapi", "workers"}
#: The server commands aios/cli.py defines itself (``api`` and ``worker`` come from entry points).
CORE_SERVER_COMMANDS = {
    "db",
    "dispatch-pending",
    "sync",
    "config",
    "users",
    "metrics",
    "beat",
    "backup",
    "up",
    "certs",
    "ha",
    "down",
    "restart",
    "ps",
    "logs",
}
CLIENT_MODULES = sorted((REPO_ROOT / "aios_client").glob("*.py"))


def run_aios(*args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", *args],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed_commands(help_text: str) -> set[str]:
    """The first word of each line of the "Commands:" section of click's help."""
    section = help_text.split("\nCommands:\n", 1)[1]
    names = set()
    for line in section.splitlines():
        if not line.strip():
            break
        if line.startswith("  ") and not line.startswith("   "):
            names.add(line.split()[0])
    return names


def test_aios_help_lists_every_command_server_and_client():
    # Given the server commands of aios/cli.py, those of the entry points, and the client group's
    from aios_client.commands import cli as client_group

    plugged = {entry.name for entry in entry_points(group="aios.commands")}
    assert {"api", "worker"} <= plugged
    expected = CORE_SERVER_COMMANDS | plugged | set(client_group.commands)
    # When `aios --help` runs
    helped = run_aios("--help")
    # Then it succeeds and lists every one of them, and nothing else
    assert helped.returncode == 0, helped.stderr
    assert listed_commands(helped.stdout) == expected


def test_a_client_option_before_a_server_command_is_a_usage_error():
    # Given `--json`, an option of the client commands / When it precedes a server command
    done = run_aios("--json", "config")
    # Then the command does not run: exit 2, and stderr says whose option it is
    assert done.returncode == 2
    assert "--json" in done.stderr and "client commands" in done.stderr
    assert not done.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["certs", "create", "--days", "0"], "--days"),
        (["logs", "nope"], "nope"),
        (["logs", "-n", "-1"], "--lines"),
        (["down", "--grace", "-1"], "--grace"),
        (["up", "--detach", "--wait", "0"], "--wait"),
        (["restart", "--wait", "-5"], "--wait"),
        (["ha", "status", "--jsn"], "--jsn"),
    ],
)
def test_a_bad_value_of_a_new_server_option_is_a_usage_error_that_names_it(args, named):
    # Given a value the option cannot take / When the command starts
    done = run_aios(*args)
    # Then nothing runs: exit 2, and stderr names the option or value
    assert done.returncode == 2, done.stdout + done.stderr
    assert named in done.stderr and not done.stdout


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports and import_module calls, anywhere)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_the_client_package_imports_nothing_of_the_server():
    # Given every module of aios_client (the scan is not vacuous)
    assert {path.name for path in CLIENT_MODULES} >= {"__init__.py", "client.py", "commands.py", "errors.py"}
    # When their imports are read
    offending = {
        str(path.relative_to(REPO_ROOT)): sorted(imported_roots(path) & SERVER_SIDE)
        for path in CLIENT_MODULES
        if imported_roots(path) & SERVER_SIDE
    }
    # Then none names aios, webapi or workers
    assert not offending, f"aios_client imports the server side: {offending}"


def test_importing_the_client_and_its_commands_loads_no_server_module():
    # Given a fresh interpreter / When it imports the client package and its commands
    code = (
        "import sys, aios_client, aios_client.commands\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'aios', 'webapi', 'workers'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    # Then no module of the server was loaded
    assert done.stdout.strip() == "[]"
