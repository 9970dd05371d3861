"""The ``aios`` command.

Core commands live here (``db``, ``dispatch-pending``, ``up``, ``config``). Commands that need the
API or the agent code (``api``, ``worker``) are contributed by those packages through the
entry-point group ``aios.commands``, so ``aios`` never imports ``webapi`` or ``workers``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from aios.config import Settings, load_settings, redact_url
from aios.errors import AiosError, ConfigError, NotMigrated
from aios.ops.log import configure_logging

COMMANDS_GROUP = "aios.commands"
#: Exit status for a configuration error (bad value, missing file).
EXIT_CONFIG = 2
#: Exit status when the database schema is not migrated.
EXIT_NOT_MIGRATED = 3

logger = logging.getLogger("aios.cli")

Handler = Callable[[argparse.Namespace, Settings], int | None]


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from aios import migrate

    if args.db_action == "upgrade":
        migrate.upgrade(settings.database, args.revision)
        revision = migrate.current_revision(settings.database)
        print(f"database {redact_url(settings.database.url)} is at revision {revision}")
    elif args.db_action == "downgrade":
        migrate.downgrade(settings.database, args.revision)
        print(f"database downgraded to {migrate.current_revision(settings.database) or 'base'}")
    else:
        current, head = migrate.current_revision(settings.database), migrate.head_revision()
        print(f"current: {current or 'none'}\nhead:    {head}")
        return 0 if current == head else 1
    return 0


def _dispatch_pending(args: argparse.Namespace, settings: Settings) -> int:
    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.tasks.create import dispatch_pending

    ensure_migrated(settings.database)
    outcome = dispatch_pending(create_celery_app(settings), settings, limit=args.limit, actor="cli")
    print(json.dumps({"queued": len(outcome.queued), "still_pending": len(outcome.pending)}))
    return 0 if not outcome.pending else 1


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.recovery.sync import run_sync

    ensure_migrated(settings.database)
    result = run_sync(create_celery_app(settings), settings, runner="cli")
    print(json.dumps(result))
    return 1 if result["errors"] else 0


def _config_show(args: argparse.Namespace, settings: Settings) -> int:
    data = settings.model_dump(mode="json")
    data["database"]["url"] = redact_url(settings.database.url)
    data["broker"]["url"] = redact_url(settings.broker.url)
    if data["security"]["jwt_secret"]:
        data["security"]["jwt_secret"] = "***"
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


def _users(args: argparse.Namespace, settings: Settings) -> int:
    from aios.db import ensure_migrated, session_scope
    from aios.security.users import create_user

    ensure_migrated(settings.database)
    if args.users_action == "create":
        password = read_password()
        with session_scope(settings.database) as session:
            user = create_user(session, args.name, password, args.role, bcrypt_cost=settings.security.bcrypt_cost)
            print(f"created user {user.name!r} with role {user.role}")
    return 0


def _metrics(args: argparse.Namespace, settings: Settings) -> int:
    from aios.ops.cluster_metrics import serve

    if args.port:
        settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(update={"port": args.port})})
    serve(settings)
    return 0


def _beat(args: argparse.Namespace, settings: Settings) -> int:
    from aios.timing.beat import run_beat

    run_beat(settings)
    return 0


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    """Backups (aios.ops.backup); a failure raises an AiosError, which main() turns into exit 1 and one line."""
    from aios.db import ensure_migrated
    from aios.ops import backup

    if args.backup_action == "create":
        ensure_migrated(settings.database)
        print(json.dumps(backup.create_backup(settings)))
    elif args.backup_action == "list":
        ensure_migrated(settings.database)
        for row in backup.list_backups(settings, limit=args.limit):
            print(json.dumps(row))
    elif args.backup_action == "verify":
        checked = backup.verify_backup(args.file, settings)
        print(f"ok {checked['path']} sha256 {checked['sha256']}")
    else:
        # No ensure_migrated: the target of a restore is usually an empty database.
        restored = backup.restore_backup(args.file, settings, force=args.force)
        print(f"restored {restored['path']} into {redact_url(settings.database.url)}")
    return 0


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from aios.ops.supervisor import run_all_in_one

    return run_all_in_one(settings, migrate_first=args.migrate, agent_name=args.agent_name)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(
        prog="aios",
        description="AIOS: an orchestrator for AI and batch workloads.",
        epilog="Commands that use a running API (see `aios COMMAND --help`): "
        + ", ".join(sorted(CLIENT_COMMANDS))
        + ". They take --url/AIOS_URL and --api-key/AIOS_API_KEY, or the token of `aios login`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}

    db = sub.add_parser("db", help="database schema: upgrade, downgrade, current")
    db_sub = db.add_subparsers(dest="db_action", required=True)
    upgrade = db_sub.add_parser("upgrade", help="apply migrations (default: up to head)")
    upgrade.add_argument("revision", nargs="?", default="head")
    downgrade = db_sub.add_parser("downgrade", help="revert migrations down to REVISION")
    downgrade.add_argument("revision")
    db_sub.add_parser("current", help="show the current and the latest revision (exit 1 if they differ)")
    handlers["db"] = _db

    pending = sub.add_parser("dispatch-pending", help="publish PENDING tasks (after a broker outage)")
    pending.add_argument("--limit", type=int, default=10_000)
    handlers["dispatch-pending"] = _dispatch_pending

    sub.add_parser("sync", help="run the sync job once; print the run as JSON (exit 1 if a step failed)")
    handlers["sync"] = _sync

    sub.add_parser("config", help="print the effective configuration (secrets hidden)")
    handlers["config"] = _config_show

    users = sub.add_parser("users", help="user accounts")
    users_sub = users.add_subparsers(dest="users_action", required=True)
    create = users_sub.add_parser("create", help="create a user; the password is read from stdin or prompted")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=["admin", "operator", "viewer", "agent"])
    handlers["users"] = _users

    metrics = sub.add_parser("metrics", help="serve the cluster's Prometheus metrics (default port 9090)")
    metrics.add_argument("--port", type=int, help="overrides [metrics] port")
    handlers["metrics"] = _metrics

    sub.add_parser("beat", help="run Celery beat with AIOS's jobs (any number; one leads)")
    handlers["beat"] = _beat

    backups = sub.add_parser("backup", help="database backups: create, list, verify, restore")
    backup_sub = backups.add_subparsers(dest="backup_action", required=True)
    backup_sub.add_parser("create", help="back up the database now (prints the backups row as JSON)")
    backup_list = backup_sub.add_parser("list", help="the newest backups rows, one JSON object a line")
    backup_list.add_argument("--limit", type=int, default=100)
    verify = backup_sub.add_parser("verify", help="check FILE against FILE.sha256 and that it is a readable dump")
    verify.add_argument("file", metavar="FILE")
    restore = backup_sub.add_parser("restore", help="restore FILE into the configured (empty) database")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--force", action="store_true", help="replace a database that holds tasks or users")
    handlers["backup"] = _backup

    up = sub.add_parser("up", help="run the API, one agent and beat together (a laptop, a demo)")
    up.add_argument("--migrate", action="store_true", help="upgrade the database schema first")
    up.add_argument("--agent-name", default="agent-1")
    handlers["up"] = _up

    for entry in entry_points(group=COMMANDS_GROUP):
        register = entry.load()
        handlers[entry.name] = register(sub)
    return parser, handlers


#: Commands that run until stopped.
SERVICES = frozenset({"api", "worker", "beat", "metrics", "up"})


#: Commands of :mod:`aios_client.commands` (click + rich): they talk to a running API instead of running AIOS.
CLIENT_COMMANDS = frozenset({"login", "logout", "submit", "tasks", "agents", "queues", "keys", "schedules", "status"})


#: Options of the client commands' group that take a value (``aios --url U submit …``).
_CLIENT_VALUE_OPTIONS = frozenset({"--url", "--api-key", "--timeout"})


def _command_word(argv: Sequence[str]) -> str | None:
    """The first word that is neither an option nor a client group option's value."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _CLIENT_VALUE_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _command_word(argv) in CLIENT_COMMANDS:
        from aios_client import commands as cli_client

        return cli_client.main(argv)
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        # Services log to stdout; a one-shot command's stdout is its answer, so its log goes to stderr.
        configure_logging(settings.logging, stream=sys.stdout if args.command in SERVICES else sys.stderr)
        from aios.security.file_modes import warn_loose_secret_files

        warn_loose_secret_files(settings, extra_key_files=[("--keyfile", getattr(args, "keyfile", None))])
        return handlers[args.command](args, settings) or 0
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
        return 130


if __name__ == "__main__":
    sys.exit(main())
