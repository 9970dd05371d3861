"""The task state machine: the only place that decides which state changes are legal, and the only
writer of ``tasks.state`` (tests/unit/test_single_state_writer.py fails on a write anywhere else).

    SCHEDULED ──► PENDING   (its run_at came: held in the database, never in the broker, until then)
    PENDING ──► QUEUED ──► RUNNING ──► SUCCEEDED | FAILED | CANCELLED | TIMED_OUT
       ▲          │           │
       └──────────┘           └──► RETRYING ──► QUEUED  (retries left, after backoff)
                              └──► DEAD                 (retries exhausted)

``PENDING`` means the row is committed but no message is known to be in the broker (the broker was
down, or no agent could take it); ``QUEUED`` means a message for the current ``dispatch_id`` was
published. A terminal state is never left: a manual retry creates a new task linked to the old one.
A task is born (:data:`INITIAL`) ``SCHEDULED``, ``PENDING``, or ``QUEUED`` when its dispatch is decided
in the transaction that creates it (``PENDING ──► QUEUED`` folded into the INSERT).

The writers, each checked against the machine:

* :func:`transition` / :func:`transition_many`: any change. One conditional UPDATE (``WHERE state =
  :from``, optionally ``AND dispatch_id = :fence``) and a ``task_events`` row, in the caller's transaction.
* :func:`claim` / :func:`record_outcome`: a run's two writes (QUEUED → RUNNING, RUNNING → its end),
  fenced on its dispatch, each its own transaction. On PostgreSQL they use this module's strategy,
  :mod:`aios.tasks.states_postgres` (one statement each: the agents' hot path); elsewhere
  :func:`transition`.
* :func:`insert_new`: the INSERT of new task rows, each in a state of :data:`INITIAL`.

Losing a race is not an error: the caller learns that 0 rows changed and decides (a duplicate delivery
is skipped, a late report is recorded as a note).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.orm import Session

from aios.config import Settings
from aios.db import session_scope
from aios.errors import IllegalTransition
from aios.models import Task, TaskEvent
from aios.tasks import states_postgres
from aios.tasks.states_postgres import Move
from aios.timeutil import utcnow


class TaskState(enum.StrEnum):
    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    DEAD = "DEAD"


S = TaskState

TERMINAL: frozenset[TaskState] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMED_OUT, S.DEAD})

#: Which states each state may move to. Anything else raises IllegalTransition.
ALLOWED: Mapping[TaskState, frozenset[TaskState]] = {
    S.SCHEDULED: frozenset({S.PENDING, S.CANCELLED}),
    S.PENDING: frozenset({S.QUEUED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.PENDING, S.CANCELLED}),
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMED_OUT, S.RETRYING, S.DEAD}),
    S.RETRYING: frozenset({S.QUEUED, S.PENDING, S.CANCELLED}),
    **{state: frozenset() for state in TERMINAL},
}

#: States a task may be born in (:func:`insert_new`): QUEUED only when its dispatch is decided in the
#: transaction that creates it (its timeline then shows PENDING → QUEUED).
INITIAL: frozenset[TaskState] = frozenset({S.SCHEDULED, S.PENDING, S.QUEUED})
_INITIAL_VALUES = frozenset(state.value for state in INITIAL)

#: States a user may cancel from, and states a user may retry (by creating a new task).
CANCELLABLE: frozenset[TaskState] = frozenset({S.SCHEDULED, S.PENDING, S.QUEUED, S.RETRYING, S.RUNNING})
RETRYABLE: frozenset[TaskState] = frozenset({S.FAILED, S.DEAD, S.CANCELLED, S.TIMED_OUT})

#: The timestamp column each state stamps when entered.
STAMPS: Mapping[TaskState, str] = {
    S.QUEUED: "queued_at",
    S.RUNNING: "started_at",
    **{state: "finished_at" for state in TERMINAL},
}


def check_transition(current: TaskState | str, target: TaskState | str) -> None:
    """Raise IllegalTransition unless ``current`` may move to ``target``."""
    current, target = TaskState(current), TaskState(target)
    if target not in ALLOWED[current]:
        if current in TERMINAL:
            raise IllegalTransition(f"task is {current}, a terminal state; it cannot become {target}")
        raise IllegalTransition(f"a task cannot go from {current} to {target}")


def transition(
    session: Session,
    task_id: str,
    current: TaskState,
    target: TaskState,
    *,
    actor: str,
    detail: Mapping[str, Any] | None = None,
    fence: str | None = None,
    values: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> bool:
    """Move one task from ``current`` to ``target`` if it is still there; record the event.

    ``fence`` adds ``AND dispatch_id = fence`` so only the holder of the current dispatch can act.
    ``values`` are extra columns to set in the same UPDATE (result, error, agent, ...).
    Returns False, writing nothing, if the row was not in ``current`` (or the fence did not match).
    The caller commits.
    """
    return transition_many(
        session, [task_id], current, target, actor=actor, detail=detail, fence=fence, values=values, now=now
    ) == [task_id]


def transition_many(
    session: Session,
    task_ids: Sequence[str],
    current: TaskState,
    target: TaskState,
    *,
    actor: str,
    detail: Mapping[str, Any] | None = None,
    fence: str | None = None,
    values: Mapping[str, Any] | None = None,
    per_task_values: Mapping[str, Mapping[str, Any]] | None = None,
    detail_for: Mapping[str, Mapping[str, Any]] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Bulk form of :func:`transition`: returns the ids that did move.

    ``per_task_values`` (task id → columns) sets different values per row, e.g. a fresh
    ``dispatch_id`` each; rows then get one UPDATE each inside the same transaction.
    """
    check_transition(current, target)
    if not task_ids:
        return []
    now = now or utcnow()
    common: dict[str, Any] = {"state": target.value, "updated_at": now, **(values or {})}
    if stamp := STAMPS.get(target):
        common.setdefault(stamp, now)

    moved: list[str] = []
    if per_task_values is None and fence is None:
        statement = (
            update(Task).where(Task.id.in_(task_ids), Task.state == current.value).values(**common).returning(Task.id)
        )
        moved = list(session.execute(statement).scalars())
    else:
        for task_id in task_ids:
            row_update = update(Task).where(Task.id == task_id, Task.state == current.value)
            if fence is not None:
                row_update = row_update.where(Task.dispatch_id == fence)
            own = {**common, **((per_task_values or {}).get(task_id, {}))}
            if session.execute(row_update.values(**own).returning(Task.id)).first() is not None:
                moved.append(task_id)
    record_events(
        session, moved, actor=actor, from_state=current, to_state=target, detail=detail, now=now, detail_for=detail_for
    )
    return moved


def record_events(
    session: Session,
    task_ids: Iterable[str],
    *,
    actor: str,
    from_state: TaskState | None,
    to_state: TaskState | None,
    detail: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    detail_for: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Append timeline rows (one INSERT). ``to_state=None`` records a note (e.g. a duplicate delivery skipped).

    ``detail_for`` adds per-task detail to the shared ``detail``.
    """
    rows = [
        {
            "task_id": task_id,
            "at": now or utcnow(),
            "actor": actor[:128],
            "from_state": from_state.value if from_state else None,
            "to_state": to_state.value if to_state else None,
            "detail": {**(detail or {}), **((detail_for or {}).get(task_id) or {})} or None,
        }
        for task_id in task_ids
    ]
    if rows:
        # The table, not the ORM entity: an ORM bulk INSERT splits the rows into one statement per
        # pattern of None values (a per-task detail makes that one statement per row); Core sends
        # them as one multi-row INSERT.
        session.execute(insert(TaskEvent.__table__), rows)


def insert_new(connection_or_session: Session | Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """INSERT new task rows (columns by name, one multi-row statement); the caller records their
    events and commits. Raises IllegalTransition, writing nothing, if a row's ``state`` is missing or
    not in :data:`INITIAL`."""
    for row in rows:
        state = row.get("state")
        if state not in _INITIAL_VALUES:
            allowed = ", ".join(sorted(INITIAL))
            raise IllegalTransition(f"task {row.get('id')} cannot be created {state}: a new task is one of {allowed}")
    if rows:
        # The table, not the ORM entity: an ORM bulk INSERT splits the rows into one statement per
        # pattern of None values; Core sends them as one multi-row INSERT.
        connection_or_session.execute(insert(Task.__table__), list(rows))


# --------------------------------------------------------------------------- a run's claim and outcome


class ClaimRow(NamedTuple):
    """What a claim hands to the run: the task's id, then :data:`CLAIM_COLUMNS`."""

    id: str
    type: str
    parameters: Any
    attempts: int
    max_retries: int


#: The columns a claim reads for the run (returned by the claim's own statement on PostgreSQL).
CLAIM_COLUMNS: tuple[str, ...] = ClaimRow._fields[1:]


@lru_cache(maxsize=32)
def _move(current: TaskState | str, target: TaskState | str) -> Move:
    """The strategy's view of a legal move: from, to, and the column it stamps."""
    check_transition(current, target)
    current, target = TaskState(current), TaskState(target)
    return Move(current.value, target.value, STAMPS.get(target))


def claim(
    settings: Settings,
    task_id: str,
    dispatch_id: str,
    agent: str,
    *,
    actor: str,
    detail: Mapping[str, Any],
    now: datetime | None = None,
) -> ClaimRow | None:
    """QUEUED → RUNNING for this dispatch (``attempts`` + 1, the run's progress cleared), with its event,
    committed: the run's :class:`ClaimRow`, or None, writing nothing, if the task was not QUEUED for
    ``dispatch_id`` (the caller notes why)."""
    now = now or utcnow()
    if states_postgres.supported(settings):
        row = states_postgres.claim(
            settings,
            _move(S.QUEUED, S.RUNNING),
            CLAIM_COLUMNS,
            task_id,
            dispatch_id,
            agent,
            actor=actor,
            detail=detail,
            now=now,
        )
        return None if row is None else ClaimRow(*row)
    with session_scope(settings.database) as session:
        claimed = transition(
            session,
            task_id,
            S.QUEUED,
            S.RUNNING,
            actor=actor,
            fence=dispatch_id,
            values={
                "agent": agent,
                "attempts": Task.attempts + 1,
                "finished_at": None,
                "progress": None,
                "progress_message": None,
            },  # progress describes the current run
            detail=detail,
            now=now,
        )
        if not claimed:
            return None
        columns = session.execute(select(*(getattr(Task, name) for name in CLAIM_COLUMNS)).where(Task.id == task_id))
        return ClaimRow(task_id, *columns.one())


def record_outcome(
    settings: Settings,
    task_id: str,
    dispatch_id: str,
    target: TaskState,
    values: Mapping[str, Any],
    *,
    actor: str,
    detail: Mapping[str, Any],
    now: datetime | None = None,
) -> bool:
    """RUNNING → ``target`` for this dispatch, setting ``values`` (a None is SQL NULL), with its event,
    committed; False, writing nothing, if the task was not RUNNING for ``dispatch_id``."""
    now = now or utcnow()
    if states_postgres.supported(settings):
        return states_postgres.outcome(
            settings, _move(S.RUNNING, target), task_id, dispatch_id, values, actor=actor, detail=detail, now=now
        )
    with session_scope(settings.database) as session:
        return transition(
            session, task_id, S.RUNNING, target, actor=actor, fence=dispatch_id, values=values, detail=detail, now=now
        )
