"""Creating tasks, and dispatching stored ones: the outbox half of AIOS's delivery guarantee.

Every task is created by :func:`create_tasks`: the API's submit and batch, commands, manual and bulk
retries, periodic schedules (a task submitted with ``run_at`` is created SCHEDULED the same way, and
:mod:`aios.timing.delayed` starts it when its time comes). A task accepted with 202 is committed to the
database *before* anything is published: its row, its first timeline events and the request's audit
row commit together, then one message per task goes out (:mod:`aios.broker.publish`) whose Celery task
id is the row id and whose only argument is the task's dispatch id. A task whose publish failed moves
back QUEUED → PENDING, fenced on that dispatch id; a process that dies between the commit and the
publish leaves a QUEUED row without a message, which the sync job finds and dispatches again.

:func:`dispatch` sends tasks already stored (PENDING, or RETRYING after a failed run) the same way: it
moves them to QUEUED with a fresh dispatch id and commits, then publishes. ``PENDING`` rows are
dispatched again by ``aios dispatch-pending`` (and by the sync job).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aios.agents.placement import Placeable, place
from aios.broker.publish import Dispatch
from aios.broker.publish import publish as publish_messages
from aios.config import Settings
from aios.db import session_scope
from aios.errors import Conflict
from aios.models import Task, TaskEvent
from aios.security.audit import Entry as AuditEntry
from aios.tasks.spec import TaskSpec, hold_until
from aios.tasks.states import TaskState, insert_new, transition_many
from aios.timeutil import isoformat, utcnow


@dataclass
class DispatchOutcome:
    queued: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Created:
    """What :func:`create_tasks` stored and published."""

    #: The stored rows (the columns written, as dicts), in the order of the specs.
    rows: list[dict[str, Any]]
    outcome: DispatchOutcome
    #: The task an earlier request with the same Idempotency-Key made (then nothing was created).
    replayed: Task | None = None

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]

    def task(self) -> Task:
        """The task of a one-spec call: as written (not read back), or the one an earlier request made."""
        if self.replayed is not None:
            return self.replayed
        (row,) = self.rows
        return Task(**row)


@dataclass(frozen=True)
class SubmitAudit:
    """The audit row of the request that creates the tasks, as plain values (the web layer reads them
    from its request; the core never does). Written in the tasks' own transaction, so the tasks and
    their audit row commit together, never one without the other."""

    entry: AuditEntry
    #: The row is about the task created (a request that submits one task); else about ``entry.target``.
    names_task: bool = False


#: Called with the session and the rows just inserted, last in :func:`create_tasks`'s transaction;
#: what it raises rolls the whole creation back.
BeforeCommit = Callable[[Session, list[dict[str, Any]]], None]


def new_task_id() -> str:
    return str(uuid.uuid4())


def create_tasks(
    celery: Celery | None,
    settings: Settings,
    specs: Sequence[TaskSpec],
    *,
    actor: str,
    audit: SubmitAudit | None = None,
    before_commit: BeforeCommit | None = None,
    publish: bool = True,
) -> Created:
    """Store new tasks, their timeline and the request's audit row in one transaction, then publish
    them: the one way a task is created.

    Placement is decided first (it reads the healthy agents, never the new rows); then every task that
    can go now is inserted already QUEUED with its dispatch id, its timeline getting both events
    (created PENDING, then QUEUED) in the same commit. A task whose ``run_at``/``delay_s`` is in the
    future is stored SCHEDULED; one that no healthy agent can take waits PENDING (``no_healthy_agent``).
    The rows go in set-based INSERTs (no ORM flush): one statement for the tasks, one for their events.
    Publishing comes after the commit, as in :func:`dispatch`.

    ``audit`` is written in the same transaction; ``before_commit(session, rows)`` runs last in it.
    With ``publish=False`` nothing is placed or published (``celery`` may be None): the tasks are stored
    PENDING for a later :func:`dispatch` (beat fires a tick's schedules, then publishes what they made).

    Idempotency: a spec whose ``idempotency_key`` its owner already used creates nothing, and the task
    the earlier request made is returned (``Created.replayed``); a key reused with a different request
    is a 409. Keys are scoped to the owner (tasks without one share a scope); the unique index on
    ``(coalesce(owner, ''), idempotency_key)`` (migration 0010) decides races between concurrent requests.
    """
    if publish and celery is None:
        raise TypeError("create_tasks: publishing needs a Celery app (or pass publish=False)")
    if not specs:
        return Created(rows=[], outcome=DispatchOutcome())
    now = utcnow()
    actor = actor[:128]
    ids = [new_task_id() for _ in specs]
    held = [hold_until(spec.run_at, spec.delay_s, now=now) for spec in specs]
    placed = _place(settings, ids, specs, held) if publish else {}
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    dispatches: list[Dispatch] = []
    for task_id, spec, run_at in zip(ids, specs, held, strict=True):
        row = new_row(task_id, spec, run_at=run_at, now=now)
        created: dict[str, Any] = {"priority": spec.priority, "queue": spec.queue}
        if spec.retry_of:
            created["retry_of"] = spec.retry_of
        if run_at is not None:
            created["run_at"] = isoformat(run_at)
        events.append(_event(task_id, now, actor, None, row["state"], created))
        queue = placed.get(task_id)
        if queue is not None:
            row.update(queue=queue, state=TaskState.QUEUED.value, dispatch_id=str(uuid.uuid4()), queued_at=now)
            events.append(_event(task_id, now, actor, TaskState.PENDING.value, row["state"], {"queue": queue}))
            dispatches.append(
                Dispatch(
                    task_id=task_id,
                    dispatch_id=row["dispatch_id"],
                    queue=queue,
                    priority=spec.priority,
                    timeout_s=spec.timeout_s,
                )
            )
        elif publish and run_at is None:
            row["pending_reason"] = "no_healthy_agent"
        rows.append(row)
    try:
        with session_scope(settings.database) as session:
            insert_new(session, rows)
            session.execute(insert(TaskEvent.__table__), events)
            if audit is not None:
                audit.entry.write(session, target=ids[0] if audit.names_task else None)
            if before_commit is not None:
                before_commit(session, rows)
    except IntegrityError:
        if len(specs) != 1 or specs[0].idempotency_key is None:
            raise
        return Created(rows=[], outcome=DispatchOutcome(), replayed=_earlier_request(settings, specs[0]))
    outcome = DispatchOutcome(pending=[row["id"] for row in rows if row["state"] == TaskState.PENDING.value])
    if not dispatches or celery is None:  # (dispatches are only made when publishing, with celery)
        return Created(rows=rows, outcome=outcome)
    failures = publish_messages(celery, settings, dispatches)
    outcome.queued = [d.task_id for d in dispatches if d.task_id not in failures]
    if failures:
        row_of = {row["id"]: row for row in rows}
        moved = _back_to_pending(settings, failures, {d.task_id: d.dispatch_id for d in dispatches}, actor)
        for task_id in moved:
            row_of[task_id].update(state=TaskState.PENDING.value, pending_reason="publish_failed", updated_at=utcnow())
        outcome.errors = failures
        outcome.pending += list(failures)
    return Created(rows=rows, outcome=outcome)


def new_row(task_id: str, spec: TaskSpec, *, run_at: datetime | None, now: datetime) -> dict[str, Any]:
    """The row of a new task made from ``spec``: the one place a spec's fields become columns.

    It starts PENDING, or SCHEDULED when held until ``run_at``; :func:`create_tasks` queues it at once
    if it can go now."""
    return {
        "id": task_id,
        "type": spec.type,
        "parameters": spec.parameters,
        "priority": spec.priority,
        "queue": spec.queue,
        "state": (TaskState.PENDING if run_at is None else TaskState.SCHEDULED).value,
        "run_at": run_at,
        "attempts": 0,
        "max_retries": spec.max_retries,
        "timeout_s": spec.timeout_s,
        "idempotency_key": spec.idempotency_key,
        "retry_of": spec.retry_of,
        "owner": spec.owner,
        "routing": spec.routing,
        "pinned_agent": spec.pinned_agent,
        "on_agent_lost": spec.on_agent_lost,
        "schedule_id": spec.schedule_id,
        "dispatch_id": None,
        "pending_reason": None,
        "queued_at": None,
        "created_at": now,
        "updated_at": now,
    }


def _place(
    settings: Settings, ids: list[str], specs: Sequence[TaskSpec], held: list[datetime | None]
) -> dict[str, str | None]:
    """The queue of each task that is not held (None: no healthy agent can take it now)."""
    return place(
        settings,
        [
            Placeable(
                id=task_id, type=spec.type, routing=spec.routing, pinned_agent=spec.pinned_agent, queue=spec.queue
            )
            for task_id, spec, run_at in zip(ids, specs, held, strict=True)
            if run_at is None
        ],
    )


def _event(
    task_id: str, now: datetime, actor: str, from_state: str | None, to_state: str, detail: dict[str, Any]
) -> dict[str, Any]:
    """A ``task_events`` row, for the one multi-row INSERT of a creation's timeline."""
    return dict(task_id=task_id, at=now, actor=actor, from_state=from_state, to_state=to_state, detail=detail)


def _earlier_request(settings: Settings, spec: TaskSpec) -> Task:
    """The task that the earlier request with ``spec``'s key (and owner) made; 409 unless it asked the same."""
    with session_scope(settings.database) as session:
        existing = session.scalars(
            select(Task).where(
                Task.idempotency_key == spec.idempotency_key, func.coalesce(Task.owner, "") == (spec.owner or "")
            )
        ).one()
        if existing.type != spec.type or existing.parameters != spec.parameters:
            raise Conflict(
                "Idempotency-Key was already used for a different request; use a new key",
                field="Idempotency-Key",
                task_id=existing.id,
            )
        return existing


def dispatch(
    celery: Celery,
    settings: Settings,
    task_ids: Sequence[str],
    *,
    actor: str,
    from_state: TaskState = TaskState.PENDING,
    countdown_s: dict[str, float] | None = None,
) -> DispatchOutcome:
    """Queue and publish tasks that are in ``from_state`` (PENDING or RETRYING).

    Tasks that moved on meanwhile (cancelled, claimed by another dispatcher) are left alone.
    """
    outcome = DispatchOutcome()
    if not task_ids:
        return outcome
    with session_scope(settings.database) as session:
        candidates = [
            Placeable(id=row.id, type=row.type, routing=row.routing, pinned_agent=row.pinned_agent, queue=row.queue)
            for row in session.execute(
                select(Task.id, Task.type, Task.routing, Task.pinned_agent, Task.queue).where(
                    Task.id.in_(list(task_ids)), Task.state == from_state.value
                )
            )
        ]
    placed = place(settings, candidates)
    routable = {task_id: queue for task_id, queue in placed.items() if queue}
    waiting = [task_id for task_id, queue in placed.items() if not queue]
    dispatch_ids = {task_id: str(uuid.uuid4()) for task_id in routable}
    with session_scope(settings.database) as session:
        if waiting:
            _wait_for_agent(session, waiting, from_state, actor)
        moved = transition_many(
            session,
            list(routable),
            from_state,
            TaskState.QUEUED,
            actor=actor,
            per_task_values={
                task_id: {"dispatch_id": dispatch_ids[task_id], "queue": routable[task_id], "pending_reason": None}
                for task_id in routable
            },
            detail_for={task_id: {"queue": routable[task_id]} for task_id in routable},
        )
        rows = session.execute(
            select(Task.id, Task.queue, Task.priority, Task.timeout_s).where(Task.id.in_(moved))
        ).all()
    by_id = {row.id: row for row in rows}
    dispatches = [
        Dispatch(
            task_id=task_id,
            dispatch_id=dispatch_ids[task_id],
            queue=by_id[task_id].queue,
            priority=by_id[task_id].priority,
            timeout_s=by_id[task_id].timeout_s,
            countdown_s=(countdown_s or {}).get(task_id),
        )
        for task_id in moved
    ]
    failures = publish_messages(celery, settings, dispatches)
    outcome.queued = [d.task_id for d in dispatches if d.task_id not in failures]
    if failures:
        _back_to_pending(settings, failures, dispatch_ids, actor)
        outcome.errors = failures
    outcome.pending = list(failures) + waiting
    return outcome


def _back_to_pending(
    settings: Settings, failures: dict[str, str], dispatch_ids: dict[str, str], actor: str
) -> list[str]:
    """Tasks whose publish failed go back QUEUED → PENDING (``publish_failed``); returns those moved.

    Fenced on the dispatch id each was queued with: only our own dispatch goes back."""
    moved: list[str] = []
    with session_scope(settings.database) as session:
        for task_id, error in failures.items():
            moved += transition_many(
                session,
                [task_id],
                TaskState.QUEUED,
                TaskState.PENDING,
                actor=actor,
                fence=dispatch_ids[task_id],
                detail={"reason": "publish failed", "error": error[:500]},
                values={"pending_reason": "publish_failed"},
            )
    return moved


def _wait_for_agent(session: Session, task_ids: list[str], from_state: TaskState, actor: str) -> None:
    """No healthy agent can take these now: they wait PENDING (reason no_healthy_agent) until one can."""
    detail = {"reason": "no_healthy_agent"}
    if from_state is TaskState.PENDING:
        session.execute(
            update(Task)
            .where(Task.id.in_(task_ids), Task.state == TaskState.PENDING.value)
            .values(pending_reason="no_healthy_agent")
        )
    else:
        transition_many(
            session,
            task_ids,
            from_state,
            TaskState.PENDING,
            actor=actor,
            detail=detail,
            values={"pending_reason": "no_healthy_agent"},
        )


def dispatch_pending(
    celery: Celery, settings: Settings, *, limit: int = 1000, actor: str = "dispatcher"
) -> DispatchOutcome:
    """Publish ``PENDING`` tasks, oldest first, at most ``limit`` per call (bounded work per run)."""
    with session_scope(settings.database) as session:
        task_ids = list(
            session.scalars(
                select(Task.id)
                .where(Task.state == TaskState.PENDING.value)
                .order_by(Task.created_at, Task.id)
                .limit(limit)
            )
        )
    return dispatch(celery, settings, task_ids, actor=actor)
