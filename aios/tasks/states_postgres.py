"""The state machine's PostgreSQL strategy: a run's claim and outcome, each as one statement.

Private to :mod:`aios.tasks.states`, which alone imports it: :func:`aios.tasks.states.claim` and
:func:`aios.tasks.states.record_outcome` decide that a move is legal (and which timestamp it stamps)
and hand it here as a :class:`Move` on PostgreSQL; elsewhere they take the portable path,
:func:`aios.tasks.states.transition`. This module knows SQL, not the state machine.

Why: with no-op tasks an agent's throughput is bounded by its round trips to the database, not by
work. Through :func:`aios.tasks.states.transition` and a pooled session a claim took six round trips (pool
ping, BEGIN, UPDATE, INSERT of the event, SELECT of the task's type and parameters, COMMIT) and an
outcome five. Here each is one:

* the same fenced conditional UPDATE ``transition`` issues (``WHERE id = :id AND state = :from AND
  dispatch_id = :fence``, stamping ``updated_at`` and the state's timestamp), ``RETURNING`` what the run
  needs instead of a second SELECT;
* its ``task_events`` row inserted by the same statement (a data-modifying CTE that selects from the
  UPDATE's output), so a row that did not move gets no event, exactly as with ``transition``;
* run in autocommit mode: a single statement is its own transaction, so the move and its event
  commit together or not at all, with one commit and no BEGIN round trip;
* compiled once, then run on the driver's cursor: SQLAlchemy's per-execution work (execution context,
  parameter processing, result wrapping) cost about a third of a pool process's Python time per task.
  The bind processors SQLAlchemy would apply (JSON encoding) are applied here; a driver error is raised
  as SQLAlchemy's own exception, so :func:`workers.runner.with_db_retry` sees what it always saw;
* on a connection the pool process keeps between runs, so no pool checkout and pre-ping per write.
  A connection error (or a standby's read-only refusal, :class:`aios.db.ReadOnlyServer`) drops it;
  :func:`workers.runner.with_db_retry` then tries again on a new one;
* the claim commits without waiting for its WAL flush (``synchronous_commit = off`` on the claim's own
  connection), the outcome waits as before. Why it is safe: PostgreSQL flushes the WAL in order, so the
  outcome's durable commit makes the claim before it durable too, and the message is acked only after
  the outcome. The claim is visible to every other session at once (only its durability is deferred,
  by at most three ``wal_writer_delay``); what a database *crash* in that window can lose is a claim of
  a run that has not recorded its outcome yet. The row is then QUEUED under the same dispatch again,
  the run's outcome finds it not RUNNING and is noted as a late report, and the sync job's
  lost-message check dispatches the task again: the at-least-once rule, as for a lost message. A
  SUCCEEDED (or any outcome) is never written this way: a lost outcome would lose a result.

SQLite has no data-modifying CTEs: :func:`supported` is False there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Connection, Dialect, Select, bindparam, insert, literal, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from aios.config import Settings
from aios.db import as_outage, get_engine
from aios.models import Task, TaskEvent

_tasks = Task.__table__
_events = TaskEvent.__table__


_lock = threading.Lock()
_held: dict[tuple[int, str, bool], Connection] = {}


def supported(settings: Settings) -> bool:
    """True where one statement can both move the row and record its event (PostgreSQL)."""
    return _is_postgresql(settings.database.url)


@lru_cache(maxsize=8)
def _is_postgresql(url: str) -> bool:  # parsing the URL cost more than a tenth of a run's Python time
    return make_url(url).get_backend_name() == "postgresql"


@contextmanager
def _connection(settings: Settings, *, durable: bool) -> Iterator[Connection]:
    """This process's autocommit connection (made on first use, again after a fork or an error).

    ``durable`` False: a connection of its own whose commits do not wait for the WAL flush (the claim,
    see the module docstring). That setting lives on the session, so such a connection is never given
    back to the engine's pool, where a durable write could pick it up: it is discarded instead."""
    key = (os.getpid(), settings.database.url, durable)
    with _lock:
        connection = _held.pop(key, None)
    if connection is None or connection.closed or connection.invalidated:
        connection = get_engine(settings.database).connect().execution_options(isolation_level="AUTOCOMMIT")
        if not durable:
            try:
                connection.exec_driver_sql("SET synchronous_commit TO off")
            except BaseException:
                _discard(connection)
                raise
    try:
        yield connection
        connection.commit()  # ends SQLAlchemy's autobegun block; the database already committed
    except BaseException:
        _discard(connection)  # its state is unknown (a dropped socket, an interrupted statement)
        raise
    with _lock:
        _held.setdefault(key, connection)  # a concurrent run's own connection may be back first
        if _held[key] is not connection:
            if durable:
                connection.close()
            else:
                _discard(connection)


def _discard(connection: Connection) -> None:
    """Close ``connection`` for good (its DBAPI connection is not returned to the pool)."""
    connection.invalidate()
    connection.close()


class Move(NamedTuple):
    """A move the state machine checked: from ``current`` to ``target``, stamping ``stamp`` (a column) if set."""

    current: str
    target: str
    stamp: str | None


def _moved_and_noted(
    move: Move,
    fixed: Mapping[str, Any],
    value_names: tuple[str, ...],
    returning: tuple[str, ...],
) -> Select[Any]:
    """``WITH moved AS (UPDATE ... RETURNING ...), noted AS (INSERT INTO task_events SELECT ... FROM moved)
    SELECT ... FROM moved``; every value is a bind parameter, so the statement is built once and cached.

    ``fixed``: column expressions set on every such move; ``value_names``: columns bound per call."""
    values: dict[str, Any] = {
        "state": move.target,
        "updated_at": bindparam("now"),
        **fixed,
        **{name: bindparam(f"v_{name}") for name in value_names},
    }
    if move.stamp:  # the timestamps transition() stamps
        values[move.stamp] = bindparam("now")
    moved = (
        update(_tasks)
        .where(
            _tasks.c.id == bindparam("task_id"),
            _tasks.c.state == move.current,
            _tasks.c.dispatch_id == bindparam("fence"),
        )
        .values(**values)
        .returning(_tasks.c.id, *(_tasks.c[name] for name in returning))
        .cte("moved")
    )
    noted = (
        insert(_events)
        .from_select(
            ["task_id", "at", "actor", "from_state", "to_state", "detail"],
            select(
                moved.c.id,
                bindparam("now", type_=_events.c.at.type),
                bindparam("actor", type_=_events.c.actor.type),
                literal(move.current, _events.c.from_state.type),
                literal(move.target, _events.c.to_state.type),
                bindparam("detail", type_=_events.c.detail.type),
            ),
        )
        .cte("noted")
    )
    return select(*moved.c).add_cte(noted)


@dataclass(frozen=True)
class _Compiled:
    """A statement compiled once for the driver: its SQL, its fixed parameters, the bind processors."""

    sql: str
    fixed: dict[str, Any]
    processors: dict[str, Callable[[Any], Any]]

    def parameters(self, given: Mapping[str, Any]) -> dict[str, Any]:
        params = {**self.fixed, **given}
        for name, process in self.processors.items():  # as SQLAlchemy does: every value, None too
            params[name] = process(params[name])
        return params


@lru_cache(maxsize=128)
def _compiled(statement: Select[Any], dialect: Dialect) -> _Compiled:
    compiled = statement.compile(dialect=dialect)
    fixed = {name: bind.effective_value for bind, name in compiled.bind_names.items() if not bind.required}
    processors: dict[str, Callable[[Any], Any]] = {}
    for bind, name in compiled.bind_names.items():
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors[name] = process
    return _Compiled(sql=compiled.string, fixed=fixed, processors=processors)


def _fetch_one(connection: Connection, statement: Select[Any], given: Mapping[str, Any]) -> tuple[Any, ...] | None:
    """Run ``statement`` on the driver's cursor of ``connection`` (in autocommit): its first row, or None."""
    compiled = _compiled(statement, connection.dialect)
    params = compiled.parameters(given)
    dbapi_connection = connection.connection.dbapi_connection
    try:
        with dbapi_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.execute(compiled.sql, params)
            return cursor.fetchone()  # type: ignore[no-any-return]
    except connection.dialect.loaded_dbapi.Error as error:
        # as_outage: a standby's read-only refusal is an outage to with_db_retry, as on the engine's path
        raise as_outage(
            DBAPIError.instance(
                compiled.sql,
                params,
                error,
                connection.dialect.loaded_dbapi.Error,
                hide_parameters=True,
                dialect=connection.dialect,
            )
        ) from error


@lru_cache(maxsize=4)
def _claim_statement(move: Move, returning: tuple[str, ...]) -> Select[Any]:
    # Progress describes the current run: cleared with the claim, as before.
    fixed = {"attempts": _tasks.c.attempts + 1, "finished_at": None, "progress": None, "progress_message": None}
    return _moved_and_noted(move, fixed, ("agent",), returning)


@lru_cache(maxsize=64)
def _outcome_statement(move: Move, value_names: tuple[str, ...], null_names: tuple[str, ...]) -> Select[Any]:
    # A None is SQL NULL, as with transition() (a bound None would become JSON 'null' in a JSON column).
    return _moved_and_noted(move, dict.fromkeys(null_names), value_names, ())


def claim(
    settings: Settings,
    move: Move,
    returning: tuple[str, ...],
    task_id: str,
    dispatch_id: str,
    agent: str,
    *,
    actor: str,
    detail: Mapping[str, Any],
    now: datetime,
) -> tuple[Any, ...] | None:
    """``move`` (QUEUED → RUNNING) for this dispatch, with its event: the row's id and ``returning``
    columns, or None if it did not move.

    Committed without waiting for the WAL flush: the run's outcome makes it durable (module docstring)."""
    with _connection(settings, durable=False) as connection:
        return _fetch_one(
            connection,
            _claim_statement(move, returning),
            {
                "task_id": task_id,
                "fence": dispatch_id,
                "now": now,
                "actor": actor[:128],
                "detail": dict(detail),
                "v_agent": agent,
            },
        )


def outcome(
    settings: Settings,
    move: Move,
    task_id: str,
    dispatch_id: str,
    values: Mapping[str, Any],
    *,
    actor: str,
    detail: Mapping[str, Any],
    now: datetime,
) -> bool:
    """``move`` (RUNNING → an end) for this dispatch, setting ``values``, with its event; False if it did not move."""
    names = tuple(sorted(name for name, value in values.items() if value is not None))
    nulls = tuple(sorted(name for name, value in values.items() if value is None))
    params = {
        "task_id": task_id,
        "fence": dispatch_id,
        "now": now,
        "actor": actor[:128],
        "detail": dict(detail),
        **{f"v_{name}": values[name] for name in names},
    }
    with _connection(settings, durable=True) as connection:
        return _fetch_one(connection, _outcome_statement(move, names, nulls), params) is not None
