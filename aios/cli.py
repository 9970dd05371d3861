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
from aios.log import configure_logging

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
    from aios.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.dispatch import dispatch_pending

    ensure_migrated(settings.database)
    outcome = dispatch_pending(create_celery_app(settings), settings, limit=args.limit, actor="cli")
    print(json.dumps({"queued": len(outcome.queued), "still_pending": len(outcome.pending)}))
    return 0 if not outcome.pending else 1


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


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from aios.supervisor import run_all_in_one

    return run_all_in_one(settings, migrate_first=args.migrate, agent_name=args.agent_name)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    parser = argparse.ArgumentParser(prog="aios", description="AIOS: an orchestrator for AI and batch workloads.")
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

    sub.add_parser("config", help="print the effective configuration (secrets hidden)")
    handlers["config"] = _config_show

    users = sub.add_parser("users", help="user accounts")
    users_sub = users.add_subparsers(dest="users_action", required=True)
    create = users_sub.add_parser("create", help="create a user; the password is read from stdin or prompted")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=["admin", "operator", "viewer", "agent"])
    handlers["users"] = _users

    up = sub.add_parser("up", help="run the API and one agent together (a laptop, a demo)")
    up.add_argument("--migrate", action="store_true", help="upgrade the database schema first")
    up.add_argument("--agent-name", default="agent-1")
    handlers["up"] = _up

    for entry in entry_points(group=COMMANDS_GROUP):
        register = entry.load()
        handlers[entry.name] = register(sub)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.logging)
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
