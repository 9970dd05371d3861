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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery import Celery
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aios.broker.celery_app import RUN_TASK_NAME, queue_name
from aios.broker.priority import to_transport
from aios.config import Settings
from aios.db import session_scope
from aios.errors import Conflict
from aios.models import Task, TaskEvent
from aios.tasks.states import TaskState, record_events, transition_many
from aios.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

#: Message header with the publish time (ISO 8601, UTC); Celery's own headers carry none.
PUBLISHED_AT_HEADER = "aios_published_at"
#: Messages per Redis pipeline round trip when several are published at once.
PUBLISH_CHUNK = 500


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
    #: A policy of aios.agents.routing, "queue" (publish to ``queue``) or "pinned" (to ``pinned_agent``).
    routing: str | None = None
    pinned_agent: str | None = None
    on_agent_lost: str = "retry"
    #: Hold the task in the database (state SCHEDULED) until this time (aios.timing.delayed) ...
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
    from aios.timing.delayed import hold_until

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
        record_events(
            session, [task.id], actor=actor, from_state=None, to_state=TaskState(task.state), detail=detail, now=now
        )
    return tasks


def accept_idempotent(
    celery: Celery, settings: Settings, spec: TaskSpec, *, actor: str, before_commit: BeforeCommit | None = None
) -> tuple[Task, bool]:
    """Store and dispatch one task (:func:`accept_tasks`), or return the task an earlier request with
    the same Idempotency-Key made.

    A key is scoped to the task's owner (the user who submitted it; tasks without an owner share one
    scope): another user's task with the same key is never returned, and never blocks this one. The
    unique index on ``(coalesce(owner, ''), idempotency_key)`` (migration 0010) decides races between
    concurrent requests. Returns ``(task, created)``. A key reused by the same owner with a different
    request is a 409. ``before_commit`` runs only when the task is created (:func:`accept_tasks`).
    """
    try:
        (row,) = accept_tasks(celery, settings, [spec], actor=actor, before_commit=before_commit).rows
        return Task(**row), True  # transient: what was written, without reading it back
    except IntegrityError:
        if spec.idempotency_key is None:
            raise
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
        return existing, False


@dataclass
class Accepted:
    """What :func:`accept_tasks` stored and published."""

    #: The stored rows (the columns written, as dicts), in the order of the specs.
    rows: list[dict[str, Any]]
    outcome: DispatchOutcome

    @property
    def ids(self) -> list[str]:
        return [row["id"] for row in self.rows]


#: Called with the session and the rows just inserted, inside :func:`accept_tasks`'s transaction: the
#: API writes its audit row there, so the tasks and their audit row commit together.
BeforeCommit = Callable[[Session, list[dict[str, Any]]], None]


def accept_tasks(
    celery: Celery,
    settings: Settings,
    specs: Sequence[TaskSpec],
    *,
    actor: str,
    before_commit: BeforeCommit | None = None,
) -> Accepted:
    """Store and dispatch new tasks in one transaction, then publish: the API's submit path.

    The same outbox as :func:`create_tasks` followed by :func:`dispatch`, in one commit instead of
    three: placement is decided first (it reads the healthy agents, never the new rows), then every
    task that can go now is inserted already ``QUEUED`` with its dispatch id, and its timeline gets
    both events (created ``PENDING``, then ``QUEUED``) in the same commit. Publishing comes after the
    commit, exactly as in :func:`dispatch`, and a failed publish moves the task back to ``PENDING``
    (fenced); a process that dies in between leaves a ``QUEUED`` row without a message, which the sync
    job's lost-message step re-dispatches. Rows are written with set-based INSERTs (no per-row ORM
    flush). Raises IntegrityError on a duplicate ``idempotency_key`` of the same owner (nothing is stored then).
    """
    from aios.agents.placement import Placeable, place
    from aios.timing.delayed import hold_until

    now = utcnow()
    ids = [new_task_id() for _ in specs]
    held = [hold_until(spec.run_at, spec.delay_s, now=now) for spec in specs]
    placed = place(
        settings,
        [
            Placeable(
                id=task_id, type=spec.type, routing=spec.routing, pinned_agent=spec.pinned_agent, queue=spec.queue
            )
            for task_id, spec, run_at in zip(ids, specs, held, strict=True)
            if run_at is None
        ],
    )
    rows: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    dispatches: list[Dispatch] = []
    actor = actor[:128]
    for task_id, spec, run_at in zip(ids, specs, held, strict=True):
        queue = placed.get(task_id)
        row = {
            "id": task_id,
            "type": spec.type,
            "parameters": spec.parameters,
            "priority": spec.priority,
            "queue": queue or spec.queue,
            "state": TaskState.PENDING.value,
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
            "dispatch_id": None,
            "pending_reason": None,
            "queued_at": None,
            "created_at": now,
            "updated_at": now,
        }
        created: dict[str, Any] = {"priority": spec.priority, "queue": spec.queue}
        if spec.retry_of:
            created["retry_of"] = spec.retry_of
        if run_at is not None:
            row["state"] = TaskState.SCHEDULED.value
            created["run_at"] = isoformat(run_at)
        elif queue is None:
            row["pending_reason"] = "no_healthy_agent"
        events.append(
            {
                "task_id": task_id,
                "at": now,
                "actor": actor,
                "from_state": None,
                "to_state": row["state"],
                "detail": created,
            }
        )
        if run_at is None and queue is not None:
            row.update(state=TaskState.QUEUED.value, dispatch_id=str(uuid.uuid4()), queued_at=now)
            events.append(
                {
                    "task_id": task_id,
                    "at": now,
                    "actor": actor,
                    "from_state": TaskState.PENDING.value,
                    "to_state": TaskState.QUEUED.value,
                    "detail": {"queue": queue},
                }
            )
            dispatches.append(
                Dispatch(
                    task_id=task_id,
                    dispatch_id=row["dispatch_id"],
                    queue=queue,
                    priority=spec.priority,
                    timeout_s=spec.timeout_s,
                )
            )
        rows.append(row)
    with session_scope(settings.database) as session:
        # Core INSERTs on the tables: one multi-row statement each (the ORM's bulk INSERT would split
        # the rows by their pattern of None values).
        session.execute(insert(Task.__table__), rows)
        session.execute(insert(TaskEvent.__table__), events)
        if before_commit is not None:
            before_commit(session, rows)
    outcome = DispatchOutcome(pending=[row["id"] for row in rows if row["state"] == TaskState.PENDING.value])
    failures = publish(celery, settings, dispatches)
    outcome.queued = [d.task_id for d in dispatches if d.task_id not in failures]
    if failures:
        row_of = {row["id"]: row for row in rows}
        moved = _back_to_pending(settings, failures, {d.task_id: d.dispatch_id for d in dispatches}, actor)
        for task_id in moved:
            row_of[task_id].update(state=TaskState.PENDING.value, pending_reason="publish_failed", updated_at=utcnow())
        outcome.errors = failures
        outcome.pending += list(failures)
    return Accepted(rows=rows, outcome=outcome)


def backoff_s(settings: Settings, attempt: int, *, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, full jitter."""
    orchestrator = settings.orchestrator
    ceiling = min(orchestrator.retry_backoff_max_s, orchestrator.retry_backoff_base_s * 2 ** (attempt - 1))
    return (rng or random).uniform(ceiling / 2, ceiling)


def publish(celery: Celery, settings: Settings, dispatches: Sequence[Dispatch]) -> dict[str, str]:
    """Publish one message per dispatch over one producer connection; returns failures (id → error).

    Several messages go in chunks of :data:`PUBLISH_CHUNK` through kombu's publish batch (one Redis
    pipeline round trip per chunk instead of one per message; transports without batches publish each
    at once). A chunk whose flush fails counts as failed whole, even if Redis took part of it: those
    tasks go back to PENDING and are dispatched again under a new dispatch id, so a message that did
    land is fenced off when it arrives (:mod:`workers.runner`). A single message retries a bounded number
    of times (``broker.publish_max_retries`` within ``publish_timeout_s``); once the broker has failed,
    the rest are not even tried, so a batch against a dead broker costs one timeout, not one per task.
    """
    failures: dict[str, str] = {}
    if not dispatches:
        return failures
    chunks = [dispatches[start : start + PUBLISH_CHUNK] for start in range(0, len(dispatches), PUBLISH_CHUNK)]
    try:
        with celery.producer_or_acquire() as producer:
            queues = _BoundQueues(celery, settings, producer)
            for index, chunk in enumerate(chunks):
                try:
                    if len(chunk) == 1:
                        _send(celery, settings, producer, queues, chunk[0])
                    else:
                        with producer.batch(max_size=len(chunk) * 2):
                            for item in chunk:
                                if queues.connected and item.countdown_s is None:
                                    _send_in_batch(celery, settings, producer, queues, item)
                                else:
                                    _send(celery, settings, producer, queues, item)
                except Exception as exc:  # noqa: BLE001 - any broker error leaves the rest PENDING
                    message = f"{type(exc).__name__}: {exc}"
                    rest = [item for later in chunks[index:] for item in later]
                    logger.warning("publish failed, %d task(s) stay PENDING: %s", len(rest), message)
                    for item in rest:
                        failures[item.task_id] = message
                    break
    except Exception as exc:  # noqa: BLE001 - could not even get a connection
        message = f"{type(exc).__name__}: {exc}"
        logger.warning("broker unavailable, %d task(s) stay PENDING: %s", len(dispatches), message)
        for item in dispatches:
            failures.setdefault(item.task_id, message)
    return failures


class _BoundQueues:
    """Each broker queue of one publish, bound to the producer's channel once.

    Given a queue by name, Celery hands kombu an unbound Queue, which kombu copies and binds for every
    message only to find it already declared (a fifth of a batch's publish time). A bound one skips
    that; kombu's own per-connection declaration cache decides as before whether to declare it.
    Binding needs the channel, and getting it connects: so the first message goes unbound, through
    the publish's bounded retry policy, and only later ones are bound (a dead broker still costs one
    bounded try, not kombu's connection retries).
    """

    def __init__(self, celery: Celery, settings: Settings, producer: Any) -> None:
        self.celery, self.settings, self.producer = celery, settings, producer
        self.bound: dict[str, Any] = {}
        #: Set once a message went out: the producer's channel exists from then on.
        self.connected = False

    def __getitem__(self, queue: str) -> Any:
        bound = self.bound.get(queue)
        if bound is not None:
            return bound
        declared = self.celery.amqp.queues[queue_name(self.settings, queue)]
        if not self.connected:
            return declared
        bound = self.bound[queue] = declared.bind(self.producer.channel)
        return bound


def _kwargsrepr(item: Dispatch) -> str:
    # Given, so Celery need not saferepr() the kwargs for every message (a tenth of a publish's time).
    return f"{{'dispatch_id': '{item.dispatch_id}'}}"


def _send(celery: Celery, settings: Settings, producer: Any, queues: _BoundQueues, item: Dispatch) -> None:
    grace = settings.orchestrator.timeout_grace_s
    celery.send_task(
        RUN_TASK_NAME,
        kwargs={"dispatch_id": item.dispatch_id},
        argsrepr="()",
        kwargsrepr=_kwargsrepr(item),
        task_id=item.task_id,
        queue=queues[item.queue],
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
    queues.connected = True


def _send_in_batch(celery: Celery, settings: Settings, producer: Any, queues: _BoundQueues, item: Dispatch) -> None:
    """What :func:`_send` publishes, for a message inside a publish batch once the connection is up.

    The message is built and published by Celery's own ``app.amqp.create_task_message`` and
    ``app.amqp.send_task_message`` (its publish signals included), as ``send_task`` does, but without
    ``send_task``'s per-call work: merging task options, routing a queue already given, looking for a
    parent task, and building a result object (about half of a batch's publish time). No retry wrapper:
    in a batch a publish only buffers; the flush is what can fail, and a failed flush fails the chunk.
    tests/integration/test_batch.py checks the messages equal ``send_task``'s.
    """
    grace = settings.orchestrator.timeout_grace_s
    kwargsrepr = _kwargsrepr(item)
    amqp = celery.amqp
    message = amqp.create_task_message(
        item.task_id,
        RUN_TASK_NAME,
        (),
        {"dispatch_id": item.dispatch_id},
        reply_to=celery.thread_oid,
        time_limit=item.timeout_s + grace,
        soft_time_limit=item.timeout_s,
        create_sent_event=celery.conf.task_send_sent_event,
        argsrepr="()",
        kwargsrepr=kwargsrepr,
        ignore_result=None,  # what send_task passes when not told
    )
    amqp.send_task_message(
        producer,
        RUN_TASK_NAME,
        message,
        queue=queues[item.queue],
        priority=to_transport(item.priority),
        argsrepr="()",
        kwargsrepr=kwargsrepr,
        headers={PUBLISHED_AT_HEADER: isoformat(utcnow())},
        retry=False,
    )


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
    from aios.agents.placement import Placeable, place

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
    failures = publish(celery, settings, dispatches)
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
        from sqlalchemy import update

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
