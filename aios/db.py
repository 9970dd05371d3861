"""Engines, sessions and the schema-version guard.

The guard (:func:`ensure_migrated`) reads both revisions here, so this module never imports
:mod:`aios.migrate` (which drives Alembic on this module's engines): the arrow goes one way.

One engine per process (and per forked child: Celery's prefork children must not share the
parent's sockets). SQLite runs in WAL mode with a busy timeout so the API, the agent and beat can
share the embedded database file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from aios.config import DatabaseSettings
from aios.errors import NotMigrated

_lock = threading.Lock()
_engines: dict[tuple[int, str], Engine] = {}
_factories: dict[Engine, sessionmaker[Session]] = {}


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
        kwargs.update(pool_size=settings.pool_size, max_overflow=settings.pool_size, pool_pre_ping=True)
    engine = create_engine(url, **kwargs)
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
    with get_engine(settings).connect() as connection:
        connection.execute(text("SELECT 1"))


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
