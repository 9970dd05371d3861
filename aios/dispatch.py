"""Submit and dispatch: the outbox half of AIOS's delivery guarantee.

A task accepted with 202 is committed to the database *before* anything is published. Dispatching
then (1) moves it ``PENDING → QUEUED`` with a fresh ``dispatch_id`` and commits, (2) publishes one
message per task whose Celery task id is the row id and whose only argument is that dispatch id,
and (3) moves every task whose publish failed back to ``PENDING``. A process that dies between (1)
and (2) leaves a ``QUEUED`` row without a message; the sync job finds and re-dispatches those.
``PENDING`` rows are dispatched again by ``aios dispatch-pending`` (and by the sync job).
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aios.celery_app import RUN_TASK_NAME, queue_name
from aios.config import Settings
from aios.db import session_scope
from aios.errors import Conflict
from aios.models import Task
from aios.priority import to_transport
from aios.states import TaskState, record_events, transition_many
from aios.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

#: Message header with the publish time (ISO 8601, UTC); Celery's own headers carry none.
PUBLISHED_AT_HEADER = "aios_published_at"


@dataclass(frozen=True)
class TaskSpec:
    """A validated request for one task (the API and the CLI build these)."""

    type: str
    parameters: dict[str, Any]
    priority: int
    max_retries: int
    timeout_s: int
    queue: str
    idempotency_key: str | None = None
    retry_of: str | None = None
    #: The user that submitted it.
    owner: str | None = None
    #: A policy of aios.routing, "queue" (publish to ``queue``) or "pinned" (to ``pinned_agent``).
    routing: str | None = None
    pinned_agent: str | None = None
    on_agent_lost: str = "retry"
    #: Hold the task in the database (state SCHEDULED) until this time (aios.scheduled) ...
    run_at: datetime | None = None
    #: ... or until this many seconds after it is stored. A time not in the future runs at once.
    delay_s: float | None = None


@dataclass(frozen=True)
class Dispatch:
    """What one publish needs to know about a task."""

    task_id: str
    dispatch_id: str
    queue: str
    priority: int
    timeout_s: int
    countdown_s: float | None = None


@dataclass
class DispatchOutcome:
    queued: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def new_task_id() -> str:
    return str(uuid.uuid4())


def create_tasks(session: Session, specs: Sequence[TaskSpec], *, actor: str) -> list[Task]:
    """Insert ``PENDING`` rows (``SCHEDULED`` if their time is in the future) and their first timeline
    event; the caller commits. Only PENDING ones are for :func:`dispatch`; beat starts the others."""
    from aios.scheduled import hold_until

    now = utcnow()
    held = [hold_until(spec.run_at, spec.delay_s, now=now) for spec in specs]
    tasks = [
        Task(
            id=new_task_id(),
            type=spec.type,
            parameters=spec.parameters,
            priority=spec.priority,
            queue=spec.queue,
            state=(TaskState.PENDING if run_at is None else TaskState.SCHEDULED).value,
            run_at=run_at,
            attempts=0,
            max_retries=spec.max_retries,
            timeout_s=spec.timeout_s,
            idempotency_key=spec.idempotency_key,
            retry_of=spec.retry_of,
            owner=spec.owner,
            routing=spec.routing,
            pinned_agent=spec.pinned_agent,
            on_agent_lost=spec.on_agent_lost,
            created_at=now,
            updated_at=now,
        )
        for spec, run_at in zip(specs, held, strict=True)
    ]
    session.add_all(tasks)
    session.flush()
    for task, spec in zip(tasks, specs, strict=True):
        detail: dict[str, Any] = {"priority": spec.priority, "queue": spec.queue}
        if spec.retry_of:
            detail["retry_of"] = spec.retry_of
        if task.run_at is not None:
            detail["run_at"] = isoformat(task.run_at)
        record_events(session, [task.id], actor=actor, from_state=None, to_state=TaskState(task.state),
                      detail=detail, now=now)
    return tasks


def submit_idempotent(settings: Settings, spec: TaskSpec, *, actor: str) -> tuple[Task, bool]:
    """Create one task, or return the task an earlier request with the same Idempotency-Key made.

    The unique index on ``idempotency_key`` decides races between concurrent requests. Returns
    ``(task, created)``. A key reused with a different request is a 409.
    """
    try:
        with session_scope(settings.database) as session:
            (task,) = create_tasks(session, [spec], actor=actor)
        return task, True
    except IntegrityError:
        if spec.idempotency_key is None:
            raise
    with session_scope(settings.database) as session:
        existing = session.scalars(select(Task).where(Task.idempotency_key == spec.idempotency_key)).one()
        if existing.type != spec.type or existing.parameters != spec.parameters:
            raise Conflict(
                "Idempotency-Key was already used for a different request; use a new key",
                field="Idempotency-Key",
                task_id=existing.id,
            )
        return existing, False


def backoff_s(settings: Settings, attempt: int, *, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, full jitter."""
    orchestrator = settings.orchestrator
    ceiling = min(orchestrator.retry_backoff_max_s, orchestrator.retry_backoff_base_s * 2 ** (attempt - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


def publish(celery: Celery, settings: Settings, dispatches: Sequence[Dispatch]) -> dict[str, str]:
    """Publish one message per dispatch over one producer connection; returns failures (id → error).

    Each publish retries a bounded number of times (``broker.publish_max_retries`` within
    ``publish_timeout_s``); once the broker has failed, the rest are not even tried, so a batch
    against a dead broker costs one timeout, not one per task.
    """
    failures: dict[str, str] = {}
    if not dispatches:
        return failures
    grace = settings.orchestrator.timeout_grace_s
    try:
        with celery.producer_or_acquire() as producer:
            for index, item in enumerate(dispatches):
                try:
                    celery.send_task(
                        RUN_TASK_NAME,
                        kwargs={"dispatch_id": item.dispatch_id},
                        task_id=item.task_id,
                        queue=queue_name(settings, item.queue),
                        priority=to_transport(item.priority),
                        soft_time_limit=item.timeout_s,
                        time_limit=item.timeout_s + grace,
                        countdown=item.countdown_s,
                        # Lets GET /queues tell how long the oldest message has waited.
                        headers={PUBLISHED_AT_HEADER: isoformat(utcnow())},
                        producer=producer,
                        retry=True,
                        retry_policy=celery.conf.task_publish_retry_policy,
                    )
                except Exception as exc:  # noqa: BLE001 - any broker error leaves the rest PENDING
                    message = f"{type(exc).__name__}: {exc}"
                    logger.warning("publish failed, %d task(s) stay PENDING: %s", len(dispatches) - index, message)
                    for rest in dispatches[index:]:
                        failures[rest.task_id] = message
                    break
    except Exception as exc:  # noqa: BLE001 - could not even get a connection
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("broker unavailable, %d task(s) stay PENDING: %s", len(dispatches), message)
        for item in dispatches:
            failures.setdefault(item.task_id, message)
    return failures


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
    from aios.placement import Placeable, place

    outcome = DispatchOutcome()
    if not task_ids:
        return outcome
    with session_scope(settings.database) as session:
        candidates = [
            Placeable(id=row.id, type=row.type, routing=row.routing, pinned_agent=row.pinned_agent, queue=row.queue)
            for row in session.execute(
                select(Task.id, Task.type, Task.routing, Task.pinned_agent, Task.queue)
                .where(Task.id.in_(list(task_ids)), Task.state == from_state.value)
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
    failures = publish(celery, settings, dispatches)
    outcome.queued = [d.task_id for d in dispatches if d.task_id not in failures]
    if failures:
        with session_scope(settings.database) as session:
            for task_id, error in failures.items():
                # Fenced: only our own dispatch goes back to PENDING.
                transition_many(
                    session, [task_id], TaskState.QUEUED, TaskState.PENDING, actor=actor,
                    fence=dispatch_ids[task_id], detail={"reason": "publish failed", "error": error[:500]},
                    values={"pending_reason": "publish_failed"},
                )
        outcome.errors = failures
    outcome.pending = list(failures) + waiting
    return outcome


def _wait_for_agent(session: Session, task_ids: list[str], from_state: TaskState, actor: str) -> None:
    """No healthy agent can take these now: they wait PENDING (reason no_healthy_agent) until one can."""
    detail = {"reason": "no_healthy_agent"}
    if from_state is TaskState.PENDING:
        from sqlalchemy import update

        session.execute(update(Task).where(Task.id.in_(task_ids), Task.state == TaskState.PENDING.value)
                        .values(pending_reason="no_healthy_agent"))
    else:
        transition_many(session, task_ids, from_state, TaskState.PENDING, actor=actor, detail=detail,
                        values={"pending_reason": "no_healthy_agent"})


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

