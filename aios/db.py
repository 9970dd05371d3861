"""Engines, sessions and the schema-version guard.

The guard (:func:`ensure_migrated`) reads both revisions here, so this module never imports
:mod:`aios.migrate` (which drives Alembic on this module's engines): the arrow goes one way.

One engine per process (and per forked child: Celery's prefork children must not share the
parent's sockets). SQLite runs in WAL mode with a busy timeout so the API, the agent and beat can
share the embedded database file.

PostgreSQL with failover: the URL may name several servers
(``?host=h1:5432&host=h2:5432&target_session_attrs=read-write``); SQLAlchemy hands them to libpq as
one conninfo and libpq connects to the first that takes writes, so after a promotion the next new
connection lands on the new primary. Connections to the old one die with it; the pool's pre-ping
replaces a dead one at checkout and a disconnect error invalidates the whole pool. A server that
turns out to be read-only (a standby, SQLSTATE 25006) is treated as an outage, never written to:
see :class:`ReadOnlyServer`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from aios.config import DatabaseSettings
from aios.errors import NotMigrated, ServiceUnavailable

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_factories: dict[Engine, sessionmaker[Session]] = {}

#: libpq settings AIOS uses unless ``database.url`` sets them (its query wins). Why: on a multi-host URL
#: whose first server is unreachable (a site lost, its packets dropped rather than refused) libpq waits
#: for the operating system's connect timeout, about two minutes, before it tries the next host:
#: ``connect_timeout`` bounds that per host. And a connection to a server behind a cut link answers
#: nothing: without ``tcp_user_timeout`` (unacknowledged data, milliseconds) and keepalives a write or a
#: pool pre-ping on it would wait for TCP's retransmissions, about fifteen minutes, before failing over.
LIBPQ_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "3",
    "keepalives_count": "3",
    "tcp_user_timeout": "10000",
}

#: SQLSTATE read_only_sql_transaction: a write reached a server in recovery (a standby).
READ_ONLY_SQLSTATE = "25006"


class ReadOnlyServer(OperationalError):
    """A write reached a read-only PostgreSQL server (a standby, or an old primary that rejoined as one).

    An :class:`~sqlalchemy.exc.OperationalError` on purpose: everything that already treats the
    database being unreachable as an outage (the API's 503, the agents' write retry) treats this the
    same way, and the connection it came from is invalidated so the retry connects anew, through
    ``target_session_attrs=read-write``, to whichever server is primary now."""


def as_outage(error: StatementError) -> StatementError:
    """``error``, or a :class:`ReadOnlyServer` (marked invalidated) when the server refused a write as read-only."""
    orig = error.orig
    if orig is None or getattr(orig, "pgcode", None) != READ_ONLY_SQLSTATE:
        return error
    return ReadOnlyServer(error.statement, error.params, orig, hide_parameters=True, connection_invalidated=True)


def _read_only_is_a_disconnect(context: ExceptionContext) -> StatementError | None:
    """``handle_error`` hook: a read-only refusal invalidates the connection (and the pool: its other
    connections were made to the same server) and is raised as :class:`ReadOnlyServer`."""
    error = context.sqlalchemy_exception
    if not isinstance(error, DBAPIError) or getattr(error.orig, "pgcode", None) != READ_ONLY_SQLSTATE:
        return None
    context.is_disconnect = True
    return as_outage(error)


def create_db_engine(settings: DatabaseSettings) -> Engine:
    """Create an engine for ``settings.url``; parameters are kept out of error messages and logs."""
    url = make_url(settings.url)
    kwargs: dict[str, Any] = {"echo": settings.echo, "hide_parameters": True, "future": True}
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database and database != ":memory:":
            # 700: the database (and its -wal, -shm) holds password hashes and task results; no other
            # local user, a command's user least of all, may read it.
            Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        kwargs["connect_args"] = {"timeout": settings.sqlite_busy_timeout_s, "check_same_thread": False}
    else:
        # pre-ping: a connection to a server that went away (a restart, a promotion elsewhere) is replaced
        # at checkout, so a read after a failover succeeds instead of failing once.
        kwargs.update(pool_size=settings.pool_size, max_overflow=settings.pool_size, pool_pre_ping=True)
        if url.get_backend_name() == "postgresql":
            kwargs["connect_args"] = libpq_connect_args(settings.url)
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "postgresql":
        event.listen(engine, "handle_error", _read_only_is_a_disconnect)
    if url.get_backend_name() == "sqlite":
        busy_ms = int(settings.sqlite_busy_timeout_s * 1000)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let pysqlite not manage transactions itself, so BEGIN IMMEDIATE below takes effect.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin_immediate(connection: Any) -> None:
            # Take the write lock up front: a deferred transaction that later writes fails with
            # "database is locked" instead of waiting its turn.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def libpq_params(url_text: str) -> tuple[dict[str, str], str | None]:
    """The libpq parameters (without the password) and the password SQLAlchemy's PostgreSQL dialect
    gives the driver for ``url_text``, with :data:`LIBPQ_DEFAULTS` where the URL sets none: what pg_dump
    and the topology probe use to reach the same servers as the engines (a multi-host URL's hosts
    become ``host=h1,h2 port=5432,5432``)."""
    url = make_url(url_text)
    _args, connect = url.get_dialect()().create_connect_args(url)
    password = connect.pop("password", None)
    params = {key: str(value) for key, value in connect.items() if value is not None}
    return {**LIBPQ_DEFAULTS, **params}, (str(password) if password else None)


def libpq_connect_args(url_text: str, **more: str) -> dict[str, str]:
    """``connect_args`` for a PostgreSQL engine: :data:`LIBPQ_DEFAULTS` the URL does not set, and ``more``."""
    query = make_url(url_text).query
    return {**{key: value for key, value in LIBPQ_DEFAULTS.items() if key not in query}, **more}


def libpq_hosts(params: dict[str, str]) -> list[tuple[str, str]]:
    """``(host, port)`` of each server a libpq ``host``/``port`` pair names, in the order libpq tries them
    (one port given serves every host; an empty entry is libpq's default)."""
    hosts = params.get("host", "").split(",")
    ports = params.get("port", "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    return [(host or "localhost", port or "5432") for host, port in zip(hosts, ports, strict=False)]


def get_engine(settings: DatabaseSettings) -> Engine:
    """The process's engine for this URL, made on first use (again after a fork)."""
    key = (os.getpid(), settings.url)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = create_db_engine(settings)
        return engine


def dispose_engines() -> None:
    """Forget every engine (called in forked children and at shutdown)."""
    with _lock:
        for (pid, _url), engine in list(_engines.items()):
            if pid == os.getpid():
                engine.dispose()
            else:
                engine.dispose(close=False)
        _engines.clear()
        _factories.clear()


def session_factory(settings: DatabaseSettings) -> sessionmaker[Session]:
    """The process's session factory for this URL, made once per engine.

    A ``sessionmaker`` builds a Session subclass and its event dispatch when made; making one per
    session cost a submit about a tenth of its CPU time (bench/profile_submit.py).
    """
    engine = get_engine(settings)
    factory = _factories.get(engine)
    if factory is None:
        with _lock:
            factory = _factories.setdefault(engine, sessionmaker(bind=engine, expire_on_commit=False, future=True))
    return factory


@contextmanager
def session_scope(settings: DatabaseSettings) -> Iterator[Session]:
    """A session that commits on success and rolls back on any exception."""
    session = session_factory(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ping(settings: DatabaseSettings) -> None:
    """The database answers and takes writes (readiness: a standby answers, but could take no task)."""
    with get_engine(settings).connect() as connection:
        if connection.dialect.name != "postgresql":
            connection.execute(text("SELECT 1"))
        elif connection.execute(text("SELECT pg_is_in_recovery()")).scalar():
            raise ServiceUnavailable(
                "the database server is a standby (read-only): database.url must reach the primary; "
                "name every server with target_session_attrs=read-write (docs/deploy.md)"
            )


#: Alembic's scripts; :mod:`aios.migrate` runs them, the guard below reads their head.
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def head_revision() -> str:
    """The newest schema revision this code has a migration for."""
    from alembic.script import ScriptDirectory  # local: only the guard and `aios db` need Alembic

    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() or ""


def current_revision(settings: DatabaseSettings) -> str | None:
    """The schema revision the database is at (None: an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with get_engine(settings).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ensure_migrated(settings: DatabaseSettings) -> None:
    """Refuse to run on a schema older (or newer) than this code's migrations."""
    current, head = current_revision(settings), head_revision()
    if current != head:
        raise NotMigrated(
            f"the database is at schema revision {current or 'none (empty database)'}, this AIOS needs "
            f"{head}: run `aios db upgrade` first"
        )
