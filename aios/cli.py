"""The ``aios`` command: one click group for every command, the server's and the client's.

- **Server commands** run AIOS: they read its configuration and talk to the database and broker.
  ``db``, ``dispatch-pending``, ``sync``, ``config``, ``users``, ``metrics``, ``beat``, ``backup``,
  ``ha``, ``up`` and its companions ``down``, ``restart``, ``ps``, ``logs`` (:mod:`aios.ops.services`)
  are here, and ``certs`` (which needs no configuration). ``api`` and ``worker`` need the web or the
  agent code, so those packages contribute them through the entry-point group ``aios.commands``: each
  entry point, named after its command, is a ``register(group)`` hook that adds click commands to this
  group, loaded only when its command is named or every command is listed (``aios --help``). So
  ``aios`` never imports ``webapi`` or
  ``workers``. Every server command's callback is wrapped by :func:`server_command`, which loads the
  settings and turns AIOS's errors into exit statuses (but ``down`` and ``logs``, which read only the
  pid file and the logs, so they work even with a broken configuration).
- **Client commands** (``login``, ``submit``, ``tasks`` …) talk to a running API over HTTP. They are
  :mod:`aios_client.commands`'s, added here as they are; the group carries their global options
  (``--url``, ``--api-key``, ``--json``, ``--timeout``, before the command) and refuses them before a
  server command, which has no use for them.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from aios.config import Settings, load_settings, redact_url
from aios.errors import AiosError, ConfigError, NotMigrated
from aios.ops import services
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
SERVICES = frozenset({"api", "worker", "beat", "metrics", "up", "restart"})

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
    for section, values in data.items():
        # A secret is a field declared with repr=False (jwt_secret, the metrics credentials).
        for key, field in type(getattr(settings, section)).model_fields.items():
            if not field.repr and values.get(key):
                values[key] = "***"
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


@cli.command(
    "metrics",
    help="serve the cluster's Prometheus metrics (default port 9090; TLS and credentials from [metrics])",
)
@click.option("--host", help="overrides [metrics] host (beyond loopback, credentials are required)")
@click.option("--port", type=int, help="overrides [metrics] port")
@server_command
def metrics(settings: Settings, host: str | None, port: int | None) -> int:
    from aios.ops.cluster_metrics import serve

    overrides = {key: value for key, value in (("host", host), ("port", port)) if value}
    if overrides:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update=overrides)})
    serve(settings)
    return 0


@cli.group(help="TLS certificates for local HTTPS")
def certs() -> None:
    pass


@certs.command("create", help="write a self-signed server.crt and server.key (mode 600) for local HTTPS")
@click.option("--dir", "directory", default="config/certs", show_default=True, help="where to write the pair")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True, help="validity")
@click.option("--host", "hosts", multiple=True, help="another DNS name or IP address (repeatable)")
@click.option("--force", is_flag=True, help="replace an existing pair")
def certs_create(directory: str, days: int, hosts: tuple[str, ...], force: bool) -> int:
    """Needs no configuration (it runs before there is one), so it is not a server_command."""
    from pathlib import Path

    from aios.security.certs import create_pair, default_names

    try:
        pair = create_pair(Path(directory), names=default_names(hosts), days=days, force=force)
    except AiosError as exc:
        print(f"aios: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"wrote {pair.cert} and {pair.key} (mode 600), valid until {pair.not_after:%Y-%m-%d} for "
        f"{', '.join(pair.names)}\n"
        f'use them: [api] tls_cert = "{pair.cert}", tls_key = "{pair.key}" '
        f"(or AIOS_API__TLS_CERT / AIOS_API__TLS_KEY); clients trust them with --cacert {pair.cert}"
    )
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


@cli.group(help="high availability: the primary/secondary pair as AIOS sees it")
def ha() -> None:
    """The two-site view (aios.ops.ha, docs/ha.md); AIOS never promotes or elects anything itself."""


@ha.command("status", help="which PostgreSQL is primary, standby lag, the Redis master, the beat leader")
@click.option("--json", "as_json", is_flag=True, help="print the status as JSON")
@server_command
def ha_status(settings: Settings, as_json: bool) -> int:
    """Exit 0 when the pair can fail over with nothing lost, 1 while a problem is listed (for probes)."""
    from aios.ops.ha import ha_status as read_status
    from aios.ops.ha import render

    status = read_status(settings)
    print(json.dumps(status.to_dict(), indent=2) if as_json else render(status))
    return 1 if status.problems else 0


def _path_option(
    flag: str, *, is_dir: bool, default: str, envvar: str, what: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--pid-file`` / ``--log-dir``: a path with a default under the working directory and a variable."""
    kind = click.Path(file_okay=not is_dir, dir_okay=is_dir, path_type=Path)
    return click.option(
        flag, type=kind, default=default, envvar=envvar, show_default=True, help=f"{what} (or {envvar})"
    )


pid_file_option = _path_option(
    "--pid-file",
    is_dir=False,
    default=services.DEFAULT_PID_FILE,
    envvar=services.PID_FILE_ENV,
    what="the detached aios up's pid file; its state file is beside it",
)
log_dir_option = _path_option(
    "--log-dir",
    is_dir=True,
    default=services.DEFAULT_LOG_DIR,
    envvar=services.LOG_DIR_ENV,
    what="where a detached aios up writes up.log and each process's log",
)


def up_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options ``up`` and ``restart`` share."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        click.option("--migrate", is_flag=True, help="upgrade the database schema first"),
        click.option("--agent-name", default="agent-1", show_default=True),
        pid_file_option,
        log_dir_option,
        click.option(
            "--wait",
            "wait_s",
            type=click.FloatRange(min=0, min_open=True),
            default=120.0,
            show_default=True,
            help="--detach: seconds to wait for every process to be healthy",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("up", help="run the API, one agent and beat together (a laptop, a demo); --detach: in the background")
@up_options
@click.option("--detach", is_flag=True, help="run in the background; return once all is up and healthy")
@click.option("--supervise", is_flag=True, hidden=True, help="(the detached supervisor itself)")
@server_command
def up(settings: Settings, detach: bool, supervise: bool, wait_s: float, **given: Any) -> int:
    from aios.ops.supervisor import UpOptions, run_all_in_one, start_detached
    from aios.security.tls import check_tls_files

    check_tls_files("api", settings.api)  # before any child starts: a bad key is one message, exit 2
    options = UpOptions(
        migrate_first=given["migrate"],
        agent_name=given["agent_name"],
        pid_file=given["pid_file"],
        log_dir=given["log_dir"],
        to_log_files=supervise,
    )
    return start_detached(settings, options, wait_s=wait_s) if detach else run_all_in_one(settings, options)


@cli.command("down", help="stop the detached aios up and everything it started (a no-op if nothing runs)")
@pid_file_option
@click.option(
    "--grace",
    "grace_s",
    type=click.FloatRange(min=0),
    default=services.DOWN_GRACE_S,
    show_default=True,
    help="seconds the supervisor gets to stop its children; then it and every process under it are killed",
)
def down(pid_file: Path, grace_s: float) -> int:
    found = services.find(pid_file)
    if found.status == "stopped":
        print(services.describe(found))
        return 0
    if found.status == "stale":
        killed = services.clean_stale(found)
        print(f"{services.describe(found)}; removed it" + (f", killed leftovers {killed}" if killed else ""))
        return 0
    started = time.monotonic()
    killed = services.stop(found, grace_s)
    print(
        f"stopped aios up (pid {found.pid}) in {time.monotonic() - started:.1f}s"
        + (f"; killed {killed} after the grace period" if killed else "")
    )
    return 0


@cli.command("restart", help="aios down, then aios up --detach")
@up_options
@server_command
def restart(settings: Settings, wait_s: float, **given: Any) -> int:
    from aios.ops.supervisor import UpOptions, start_detached
    from aios.security.tls import check_tls_files

    check_tls_files("api", settings.api)  # refuse before stopping what runs, not after
    found = services.find(given["pid_file"])
    if found.status == "running":
        services.stop(found, services.DOWN_GRACE_S)
    options = UpOptions(
        migrate_first=given["migrate"],
        agent_name=given["agent_name"],
        pid_file=given["pid_file"],
        log_dir=given["log_dir"],
    )
    return start_detached(settings, options, wait_s=wait_s)


@cli.command("ps", help="what aios up runs: each process with pid, uptime and health (exit 1 unless all is well)")
@pid_file_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@server_command
def ps(settings: Settings, pid_file: Path, as_json: bool) -> int:
    found = services.find(pid_file)
    rows = services.health(settings, found)
    ok = found.status == "running" and bool(rows) and all(row.healthy for row in rows)
    if as_json:
        print(
            json.dumps(
                {
                    "status": found.status,
                    "pid_file": str(pid_file),
                    "pid": found.pid,
                    "healthy": ok,
                    "processes": [row.to_json() for row in rows],
                }
            )
        )
    else:
        print(services.render(found, rows))
    return 0 if ok else 1


@cli.command("logs", help="the last lines of the detached aios up's logs (all, or one process); -f follows")
@click.argument("name", required=False, type=click.Choice([*services.CHILD_NAMES, services.SUPERVISOR_LOG]))
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines (Ctrl-C stops)")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True)
@log_dir_option
def logs(name: str | None, follow: bool, lines: int, log_dir: Path) -> int:
    files = services.log_files(log_dir, [name] if name else [*services.CHILD_NAMES, services.SUPERVISOR_LOG])
    if not any(path.exists() for path in files.values()):
        print(f"aios: no logs in {log_dir}/ (is aios up --detach running here? see --log-dir)", file=sys.stderr)
        return 1

    def prefix(who: str) -> str:
        return "" if name else f"{who:<5}| "

    for who, path in files.items():
        for line in services.last_lines(path, lines):
            print(prefix(who) + line)
    if follow:
        try:
            for who, line in services.follow(files):
                print(prefix(who) + line, flush=True)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
    return 0


# --------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``aios``: run one command; its exit status is returned (see :func:`aios_client.commands.run`)."""
    return client_commands.run(cli, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
