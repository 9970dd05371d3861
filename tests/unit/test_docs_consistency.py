"""The docs and the code name the same things: config keys, routes and error codes.

Each test reads both sides and fails with the names one has and the other lacks, so a key, route or
error code added without its doc line (or a doc line left for something removed) is caught by
``make test``, not by a user.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from pydantic import BaseModel

from aios import errors
from aios.config import Settings, load_settings
from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))


# --------------------------------------------------------------------------- config keys


def table_rows(path: Path, header: str, *, row_start: str = "|", sep: str = "|") -> Iterator[list[str]]:
    """The stripped cells of each row of the Markdown table of ``path`` whose header line starts with
    ``header``: the lines after its separator line, up to the first that does not start with ``row_start``
    (``sep`` splits the cells: `` | `` where a cell may hold a ``|`` of its own)."""
    text = path.read_text()
    for line in text[text.index(header) :].splitlines()[2:]:
        if not line.startswith(row_start):
            break
        yield [cell.strip() for cell in line.strip("|").split(sep)]


def config_keys() -> set[str]:
    """Every ``section.key`` the loader accepts."""
    keys = set()
    for section, field in Settings.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        keys.update(f"{section}.{key}" for key in model.model_fields)
    return keys


def readme_config_keys() -> set[str]:
    """The keys README's configuration table names. A cell may list several (`agents.cpu_degraded_pct`,
    `memory_degraded_pct`): a name without a section takes the one before it in the cell."""
    keys = set()
    for cell, *_ in table_rows(README, "| key | default | meaning |"):
        section = None
        for name in re.findall(r"`([a-z_.]+)`", cell):
            if "." in name:
                section, _ = name.split(".", 1)
                keys.add(name)
            elif section:
                keys.add(f"{section}.{name}")
    return keys


def test_every_config_key_is_in_the_readme_table_and_every_row_is_a_key():
    code, documented = config_keys(), readme_config_keys()
    assert not code - documented, f"keys missing from README's configuration table: {sorted(code - documented)}"
    assert not documented - code, f"README documents keys the loader refuses: {sorted(documented - code)}"


# --------------------------------------------------------------------------- routes


def _normal(path: str) -> str:
    """A route's shape: each parameter, ``<name>``, ``<path:name>`` or ``{name}``, becomes ``{}``."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path.rstrip("/") or "/")


ROLE_ORDER = ("viewer", "operator", "agent", "admin")


def _who(view: object) -> str:
    """Who may call a view, as docs/api.md's route table says it."""
    roles = getattr(view, "aios_roles", None) or getattr(view, "aios_ui_roles", None)
    if getattr(view, "aios_public", False) and not getattr(view, "aios_ui_roles", None):
        return "anyone"
    return ", ".join(role for role in ROLE_ORDER if role in (roles or ()))


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], str]:
    """(method, shape) → who may call it, for every route of the app, built on a throwaway SQLite ledger."""
    from aios import migrate
    from aios.db import dispose_engines
    from webapi.app import create_app

    folder = tmp_path_factory.mktemp("routes")
    settings = load_settings(
        environ={
            "AIOS_DATABASE__URL": f"sqlite:///{folder}/r.db",
            "AIOS_SECURITY__JWT_SECRET": "r" * 64,
            "AIOS_LOGGING__DIR": "",
            "AIOS_BROKER__DATA_DIR": str(folder / "broker"),
        }
    )
    migrate.upgrade(settings.database)
    try:
        app = create_app(settings)
        return {
            (method, _normal(rule.rule)): _who(app.view_functions[rule.endpoint])
            for rule in app.url_map.iter_rules()
            if rule.endpoint != "static"
            for method in rule.methods - {"HEAD", "OPTIONS"}
        }
    finally:
        dispose_engines()


@pytest.fixture(scope="module")
def routes(app_routes: dict[tuple[str, str], str]) -> set[tuple[str, str]]:
    return set(app_routes)


DOC_ROUTE = re.compile(r"\b(GET|POST|PUT|PATCH|DELETE)\s+`?(/(?:api/v1|ui|healthz|readyz|metrics)[^\s`?)|,;]*)")


def documented_routes() -> Iterator[tuple[str, str, str]]:
    """(method, shape, file) of every ``METHOD /path`` the README and docs/ mention."""
    for path in [README, *DOCS]:
        for method, route in DOC_ROUTE.findall(path.read_text()):
            yield method, _normal(route.rstrip(".:")), path.name


def test_every_route_of_the_app_is_documented(routes):
    documented = {(method, shape) for method, shape, _ in documented_routes()}
    missing = sorted(routes - documented)
    assert not missing, "routes no doc names as `METHOD /path` (README.md or docs/*.md): " + ", ".join(
        f"{method} {shape}" for method, shape in missing
    )


def test_every_documented_route_exists(routes):
    wrong = sorted(
        {(method, shape, name) for method, shape, name in documented_routes() if (method, shape) not in routes}
    )
    assert not wrong, "docs name routes the app does not have: " + ", ".join(
        f"{method} {shape} ({name})" for method, shape, name in wrong
    )


def test_the_route_table_gives_each_routes_roles_as_the_app_declares_them(app_routes):
    rows = {}
    for route, who, _ in table_rows(REPO_ROOT / "docs" / "api.md", "| route | who | operation id |"):
        method, path = route.strip("`").split(" ", 1)
        rows[(method, _normal(path))] = who
    assert set(rows) == set(app_routes), sorted(set(rows) ^ set(app_routes))
    wrong = sorted(
        f"{m} {p}: table says {rows[(m, p)]!r}, app {who!r}"
        for (m, p), who in app_routes.items()
        if rows[(m, p)] != who
    )
    assert not wrong, "docs/api.md's route table gives other roles: " + "; ".join(wrong)


# --------------------------------------------------------------------------- error codes

#: Codes of the error tree that are no HTTP answer in the normal course: a process that will not start
#: (``config_error``, exit status 2; docs/api.md lists the deployment fault it may answer as a 500).
#: The signals a task's code raises to end its run are not in the tree (aios.tasktypes.signals).
NOT_ANSWERS = {"config_error"}


def answerable_codes() -> dict[str, int]:
    """Every ``error`` code the API can answer, with its status: the error tree's, Werkzeug's HTTP
    errors as webapi/errors.py names them, and the handlers' own."""
    from webapi.errors import _HTTP_CODES

    codes: dict[str, int] = {}
    pending: list[type[errors.AiosError]] = [errors.AiosError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.code not in NOT_ANSWERS:
            codes.setdefault(cls.code, cls.status)
    for status, code in _HTTP_CODES.items():
        codes.setdefault(code, status)
    codes.update({"database_unavailable": 503, "internal_error": 500, "http_error": 0})
    return codes


def _table_codes(path: Path) -> dict[str, set[int]]:
    """code → the statuses its rows give, from every table row of ``path`` that starts with a status
    (api.md: ``| 404 | `not_found` |``) or names one in parentheses (client.md: ``(404)``)."""
    found: dict[str, set[int]] = {}
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            continue
        statuses = [int(s) for s in re.findall(r"^\|\s*(\d{3})\s*\||\((\d{3})\)", line) for s in s if s]
        for code in re.findall(r"`([a-z_]+)`", line):
            found.setdefault(code, set()).update(statuses)
    return found


@pytest.mark.parametrize("doc", ["api.md", "client.md"])
def test_the_error_tables_list_every_code_the_api_can_answer_with_its_status(doc):
    table = _table_codes(REPO_ROOT / "docs" / doc)
    problems = [
        f"{code} ({status})"
        for code, status in sorted(answerable_codes().items())
        if code not in table or (status and status not in table[code])
    ]
    assert not problems, f"docs/{doc}'s error table lacks, or gives another status for: {', '.join(problems)}"


def test_the_python_client_has_a_class_for_every_code_the_api_can_answer():
    """A script can catch each answer by its class; only the framework's catch-all goes by status."""
    from aios_client.client import ERRORS_BY_CODE, ERRORS_BY_STATUS

    codes = answerable_codes()
    missing = sorted(code for code in codes if code != "http_error" and code not in ERRORS_BY_CODE)
    assert not missing, f"aios_client.client has no class for: {missing}"
    wrong = sorted(
        code
        for code, status in codes.items()
        if code != "http_error"
        and ERRORS_BY_CODE[code] is not ERRORS_BY_STATUS.get(status)
        and not issubclass(ERRORS_BY_CODE[code], ERRORS_BY_STATUS.get(status, object))
    )
    assert not wrong, f"aios_client.client classes that are not of their status's class: {wrong}"


# --------------------------------------------------------------------------- commands


def documented_commands() -> Iterator[tuple[list[str], str]]:
    """(argv after ``aios``, file) of every ``aios …`` command in a code block of the README or docs/
    (after any ``NAME=value`` environment words; ``[…]`` of a synopsis read as the words inside)."""
    import shlex

    for path in [README, *DOCS]:
        in_block = False
        for line in path.read_text().splitlines():
            if line.startswith("```"):
                in_block = not in_block
                continue
            code = line.split(" #", 1)[0].strip().removeprefix("$ ")
            if not in_block or "aios" not in code:
                continue
            for part in re.split(r" ; | && | \| ", code):
                try:
                    words = shlex.split(part.replace("[", "").replace("]", ""))
                except ValueError:
                    continue
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                    words.pop(0)
                if words and (words[0] == "aios" or words[0].endswith("/aios")):
                    yield words[1:], path.name


def _parse(argv: list[str]) -> None:
    """Parse ``argv`` as ``aios``'s click group does, down to the last subcommand, running nothing."""
    from click.testing import CliRunner

    from aios.cli import cli

    with CliRunner().isolation(input="answer\n" * 4):  # a prompted option (login's password) gets an answer
        _parse_group(cli, argv)


def _parse_group(cli: click.Group, argv: list[str]) -> None:
    ctx = cli.make_context("aios", list(argv))
    command: click.Command = cli
    while isinstance(command, click.Group):
        args = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]  # click 8.2 deprecates protected_args
        if not args:
            return
        name, sub, rest = command.resolve_command(ctx, args)
        assert sub is not None, f"no command {name}"
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


def test_every_command_line_in_the_docs_parses():
    failures = []
    lines = list(documented_commands())
    assert len(lines) > 20, len(lines)
    for argv, name in lines:
        try:
            _parse(argv)
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - click raises (and exits on --help)
            failures.append(f"aios {' '.join(argv)} ({name}): {type(exc).__name__} {exc}")
    assert not failures, "documented commands that do not parse:\n" + "\n".join(failures)


def cli_commands() -> dict[str, set[str]]:
    """``aios <path>`` → its long flags, from the CLI's one click tree (the entry points' commands too)."""
    from aios.cli import cli

    found: dict[str, set[str]] = {}
    root = click.Context(cli, info_name="aios")

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name in command.list_commands(root):
                sub = command.get_command(root, name)
                assert sub is not None, name
                walk(sub, [*path, name])
        else:
            found[" ".join(["aios", *path])] = {
                flag
                for param in command.params
                if isinstance(param, click.Option)
                for flag in param.opts
                if flag.startswith("--") and flag != "--help"
            }

    walk(cli, [])
    return found


def documented_cli_table() -> dict[str, set[str]]:
    """docs/cli.md's "Every command" table: ``aios <path>`` → the flags its row names."""
    rows = {}
    header = "| command | arguments and flags | what it does |"
    for command, flags, _ in table_rows(REPO_ROOT / "docs" / "cli.md", header, row_start="| `aios", sep=" | "):
        rows[command.strip("`")] = set(re.findall(r"`(--[a-z-]+)`", flags))
    return rows


def test_every_cli_command_and_flag_is_in_the_docs_table_and_every_row_exists():
    code, documented = cli_commands(), documented_cli_table()
    assert set(code) == set(documented), (
        f"commands missing from docs/cli.md: {sorted(set(code) - set(documented))}; "
        f"documented but not a command: {sorted(set(documented) - set(code))}"
    )
    wrong = {
        command: (sorted(code[command] - flags), sorted(flags - code[command]))
        for command, flags in documented.items()
        if flags != code[command]
    }
    assert not wrong, f"docs/cli.md's flags differ (missing, unknown): {wrong}"
