"""The ``aios`` command: one click group for every command, the server's and the client's.

- **Server commands** run AIOS: they read its configuration and talk to the database and broker.
  ``db``, ``dispatch-pending``, ``sync``, ``config``, ``users``, ``metrics``, ``beat``, ``backup`` and
  ``up`` are here. ``api`` and ``worker`` need the web or the agent code, so those packages contribute
  them through the entry-point group ``aios.commands``: each entry point, named after its command, is a
  ``register(group)`` hook that adds click commands to this group, loaded only when its command is
  named or every command is listed (``aios --help``). So ``aios`` never imports ``webapi`` or
  ``workers``. Every server command's callback is wrapped by :func:`server_command`, which loads the
  settings and turns AIOS's errors into exit statuses.
- **Client commands** (``login``, ``submit``, ``tasks`` …) talk to a running API over HTTP. They are
  :mod:`aios_client.commands`'s, added here as they are; the group carries their global options
  (``--url``, ``--api-key``, ``--json``, ``--timeout``, before the command) and refuses them before a
  server command, which has no use for them.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

import click
from click.core import ParameterSource

from aios.config import Settings, load_settings, redact_url
from aios.errors import AiosError, ConfigError, NotMigrated
from aios.ops.log import configure_logging
from aios_client import commands as client_commands

COMMANDS_GROUP = "aios.commands"
#: Exit status for a configuration error (bad value, missing file).
EXIT_CONFIG = 2
#: Exit status when the database schema is not migrated.
EXIT_NOT_MIGRATED = 3
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
EXIT_INTERRUPTED = 130

#: Commands that run until stopped: they log to stdout (a one-shot command's stdout is its answer).
SERVICES = frozenset({"api", "worker", "beat", "metrics", "up"})

#: Commands of :mod:`aios_client.commands` (click + rich): they talk to a running API instead of running AIOS.
CLIENT_COMMANDS = frozenset(client_commands.cli.commands)


# --------------------------------------------------------------------------- plumbing


def _top_command(ctx: click.Context) -> str | None:
    """The name of the command right under ``aios`` that ``ctx`` belongs to (``db`` for ``aios db upgrade``)."""
    while ctx.parent is not None and ctx.parent.parent is not None:
        ctx = ctx.parent
    return ctx.info_name


def server_command(callback: Callable[..., int | None]) -> Callable[..., int]:
    """Make ``callback`` the callback of a command that runs AIOS: it gets the Settings first, then its
    parameters, and returns its exit status (``None`` is 0).

    Around it, the same for every server command: the settings are loaded; logging goes to stdout for a
    service and to stderr for a one-shot command; each secret file others can read (``--keyfile`` too)
    gets a warning; an AIOS error ends the command with one line on stderr and its status: a bad
    configuration 2 (:data:`EXIT_CONFIG`), an unmigrated database 3 (:data:`EXIT_NOT_MIGRATED`), any
    other 1. Ctrl-C is 130.
    """

    @functools.wraps(callback)
    def run(**params: Any) -> int:
        command = _top_command(click.get_current_context())
        try:
            settings = load_settings()
            configure_logging(settings.logging, stream=sys.stdout if command in SERVICES else sys.stderr)
            from aios.security.file_modes import warn_loose_secret_files

            warn_loose_secret_files(settings, extra_key_files=[("--keyfile", params.get("keyfile"))])
            return callback(settings, **params) or 0
        except ConfigError as exc:
            print(f"aios: {exc.message}", file=sys.stderr)
            return EXIT_CONFIG
        except NotMigrated as exc:
            print(f"aios: {exc.message}", file=sys.stderr)
            return EXIT_NOT_MIGRATED
        except AiosError as exc:
            print(f"aios: {exc.message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED

    return run


class AiosGroup(click.Group):
    """A click group that also holds the commands of the ``aios.commands`` entry points, each loaded
    when its name is first asked for (so ``aios tasks ls`` never imports the web or the agent code)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._registered: set[str] = set()

    def _register(self, only: str | None = None) -> None:
        for entry in entry_points(group=COMMANDS_GROUP):
            if entry.name not in self._registered and only in (None, entry.name):
                self._registered.add(entry.name)
                entry.load()(self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self._register(cmd_name)
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._register()
        return super().list_commands(ctx)


@click.group(
    cls=AiosGroup,
    context_settings=client_commands.CONTEXT_SETTINGS,
    epilog="The client commands ("
    + ", ".join(sorted(CLIENT_COMMANDS))
    + ") talk to a running API and take the options above, or the token of `aios login`; the others run"
    " AIOS and read its configuration (config/aios.toml, AIOS_*). See `aios COMMAND --help`.",
)
@client_commands.client_options
@click.pass_context
def cli(ctx: click.Context, url: str | None, api_key: str | None, as_json: bool, timeout: float) -> None:
    """AIOS: an orchestrator for AI and batch workloads."""
    if ctx.invoked_subcommand in CLIENT_COMMANDS:
        client_commands.open_session(ctx, url, api_key, as_json, timeout)
        return
    given = [
        param.opts[0]
        for param in ctx.command.params
        if param.name in client_commands.CLIENT_OPTIONS
        and ctx.get_parameter_source(param.name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(given)}: an option of the client commands, not of `aios {ctx.invoked_subcommand}`", ctx
        )


for _client_command in client_commands.cli.commands.values():
    cli.add_command(_client_command)


# --------------------------------------------------------------------------- the server commands


@cli.group(help="database schema: upgrade, downgrade, current")
def db() -> None:
    pass


@db.command("upgrade", help="apply migrations (default: up to head)")
@click.argument("revision", default="head")
@server_command
def db_upgrade(settings: Settings, revision: str) -> int:
    from aios import migrate

    migrate.upgrade(settings.database, revision)
    current = migrate.current_revision(settings.database)
    print(f"database {redact_url(settings.database.url)} is at revision {current}")
    return 0


@db.command("downgrade", help="revert migrations down to REVISION")
@click.argument("revision")
@server_command
def db_downgrade(settings: Settings, revision: str) -> int:
    from aios import migrate

    migrate.downgrade(settings.database, revision)
    print(f"database downgraded to {migrate.current_revision(settings.database) or 'base'}")
    return 0


@db.command("current", help="show the current and the latest revision (exit 1 if they differ)")
@server_command
def db_current(settings: Settings) -> int:
    from aios import migrate

    current, head = migrate.current_revision(settings.database), migrate.head_revision()
    print(f"current: {current or 'none'}\nhead:    {head}")
    return 0 if current == head else 1


@cli.command("dispatch-pending", help="publish PENDING tasks (after a broker outage)")
@click.option("--limit", type=int, default=10_000)
@server_command
def dispatch_pending(settings: Settings, limit: int) -> int:
    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.tasks.create import dispatch_pending

    ensure_migrated(settings.database)
    outcome = dispatch_pending(create_celery_app(settings), settings, limit=limit, actor="cli")
    print(json.dumps({"queued": len(outcome.queued), "still_pending": len(outcome.pending)}))
    return 0 if not outcome.pending else 1


@cli.command("sync", help="run the sync job once; print the run as JSON (exit 1 if a step failed)")
@server_command
def sync(settings: Settings) -> int:
    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.recovery.sync import run_sync

    ensure_migrated(settings.database)
    result = run_sync(create_celery_app(settings), settings, runner="cli")
    print(json.dumps(result))
    return 1 if result["errors"] else 0


@cli.command("config", help="print the effective configuration (secrets hidden)")
@server_command
def config_show(settings: Settings) -> int:
    data = settings.model_dump(mode="json")
    data["database"]["url"] = redact_url(settings.database.url)
    data["broker"]["url"] = redact_url(settings.broker.url)
    if data["security"]["jwt_secret"]:
        data["security"]["jwt_secret"] = "***"
    if data["broker"]["sentinel_password"]:
        data["broker"]["sentinel_password"] = "***"
    print(json.dumps(data, indent=2))
    return 0


def read_password(prompt: str = "password: ") -> str:
    """From standard input when it is not a terminal (scripts, CI); else prompt twice without echo."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise AiosError("the two passwords differ")
    return first


@cli.group(help="user accounts")
def users() -> None:
    pass


@users.command("create", help="create a user; the password is read from stdin or prompted")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["admin", "operator", "viewer", "agent"]))
@server_command
def users_create(settings: Settings, name: str, role: str) -> int:
    from aios.db import ensure_migrated, session_scope
    from aios.security.users import create_user

    ensure_migrated(settings.database)
    password = read_password()
    with session_scope(settings.database) as session:
        user = create_user(session, name, password, role, bcrypt_cost=settings.security.bcrypt_cost)
        print(f"created user {user.name!r} with role {user.role}")
    return 0


@cli.command("metrics", help="serve the cluster's Prometheus metrics (default port 9090)")
@click.option("--port", type=int, help="overrides [metrics] port")
@server_command
def metrics(settings: Settings, port: int | None) -> int:
    from aios.ops.cluster_metrics import serve

    if port:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"port": port})})
    serve(settings)
    return 0


@cli.command("beat", help="run Celery beat with AIOS's jobs (any number; one leads)")
@server_command
def beat(settings: Settings) -> int:
    from aios.timing.beat import run_beat

    run_beat(settings)
    return 0


@cli.group(help="database backups: create, list, verify, restore")
def backup() -> None:
    """Backups (aios.ops.backup); a failure raises an AiosError: exit 1 and one line (server_command)."""


@backup.command("create", help="back up the database now (prints the backups row as JSON)")
@server_command
def backup_create(settings: Settings) -> int:
    from aios.db import ensure_migrated
    from aios.ops import backup

    ensure_migrated(settings.database)
    print(json.dumps(backup.create_backup(settings)))
    return 0


@backup.command("list", help="the newest backups rows, one JSON object a line")
@click.option("--limit", type=int, default=100)
@server_command
def backup_list(settings: Settings, limit: int) -> int:
    from aios.db import ensure_migrated
    from aios.ops import backup

    ensure_migrated(settings.database)
    for row in backup.list_backups(settings, limit=limit):
        print(json.dumps(row))
    return 0


@backup.command("verify", help="check FILE against FILE.sha256 and that it is a readable dump")
@click.argument("file", metavar="FILE")
@server_command
def backup_verify(settings: Settings, file: str) -> int:
    from aios.ops import backup

    checked = backup.verify_backup(file, settings)
    print(f"ok {checked['path']} sha256 {checked['sha256']}")
    return 0


@backup.command("restore", help="restore FILE into the configured (empty) database")
@click.argument("file", metavar="FILE")
@click.option("--force", is_flag=True, help="replace a database that holds tasks or users")
@server_command
def backup_restore(settings: Settings, file: str, force: bool) -> int:
    from aios.ops import backup

    # No ensure_migrated: the target of a restore is usually an empty database.
    restored = backup.restore_backup(file, settings, force=force)
    print(f"restored {restored['path']} into {redact_url(settings.database.url)}")
    return 0


@cli.command("up", help="run the API, one agent and beat together (a laptop, a demo)")
@click.option("--migrate", is_flag=True, help="upgrade the database schema first")
@click.option("--agent-name", default="agent-1")
@server_command
def up(settings: Settings, migrate: bool, agent_name: str) -> int:
    from aios.ops.supervisor import run_all_in_one

    return run_all_in_one(settings, migrate_first=migrate, agent_name=agent_name)


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``aios``: run one command; its exit status is returned (see :func:`aios_client.commands.run`)."""
    return client_commands.run(cli, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
