"""The task state machine: the only place that decides which state changes are legal.

    SCHEDULED ──► PENDING   (its run_at came: held in the database, never in the broker, until then)
    PENDING ──► QUEUED ──► RUNNING ──► SUCCEEDED | FAILED | CANCELLED | TIMED_OUT
       ▲          │           │
       └──────────┘           └──► RETRYING ──► QUEUED  (retries left, after backoff)
                              └──► DEAD                 (retries exhausted)

``PENDING`` means the row is committed but no message is known to be in the broker (the broker was
down, or no agent could take it); ``QUEUED`` means a message for the current ``dispatch_id`` was
published. A terminal state is never left: a manual retry creates a new task linked to the old one.

Every change goes through :func:`transition` (or :func:`transition_many`), which issues one
conditional UPDATE (``WHERE state = :from``, optionally ``AND dispatch_id = :fence``) and appends a
``task_events`` row in the same transaction. Losing a race is not an error: the caller learns that
0 rows changed and decides (a duplicate delivery is skipped, a late report is recorded as a note).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.orm import Session

from aios.errors import IllegalTransition
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
    from aios.models import Task  # local: models imports this module for the enum

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
            statement = update(Task).where(Task.id == task_id, Task.state == current.value)
            if fence is not None:
                statement = statement.where(Task.dispatch_id == fence)
            own = {**common, **((per_task_values or {}).get(task_id, {}))}
            if session.execute(statement.values(**own).returning(Task.id)).first() is not None:
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
    from aios.models import TaskEvent

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
