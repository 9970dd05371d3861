"""Reading and steering tasks in the ledger: find, cancel, retry (listing and search: aios.tasks.search).

Plain functions over a Settings object and a Celery app, shared by the API and the CLI.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from aios.config import Settings
from aios.db import session_scope
from aios.errors import Conflict, Forbidden, NotFound
from aios.models import Task
from aios.tasks.create import create_tasks
from aios.tasks.spec import retry_spec
from aios.tasks.states import CANCELLABLE, RETRYABLE, TERMINAL, TaskState, transition
from aios.tasks.view import BODY_FIELDS, Reader, redact
from aios.timeutil import isoformat

logger = logging.getLogger(__name__)


def get_task(session: Session, task_id: str, *, with_events: bool = False) -> Task:
    if "\x00" in task_id:  # no id has one, and PostgreSQL refuses NUL in a query parameter (a 500)
        raise NotFound(f"no task with id {task_id!r}", field="id")
    statement = select(Task).where(Task.id == task_id)
    if with_events:
        statement = statement.options(selectinload(Task.events))
    task = session.scalars(statement).one_or_none()
    if task is None:
        raise NotFound(f"no task with id {task_id!r}", field="id")
    return task


def revoke(celery: Celery, task_id: str, *, terminate: bool) -> None:
    """Tell agents to drop (or kill) a task. Best effort: the database row is what makes it stick."""
    try:
        celery.control.revoke(task_id, terminate=terminate, signal="SIGTERM")
    except Exception as exc:  # noqa: BLE001 - the claim check still stops a queued copy
        logger.warning("could not broadcast revoke of %s: %s", task_id, exc)


def check_owner(task: Task, only_owner: str | None) -> None:
    """Object-level authorization: with ``only_owner`` set, the task must be theirs."""
    if only_owner is not None and task.owner != only_owner:
        raise Forbidden(f"task {task.id} belongs to another user; only its owner or an admin may change it")


def cancel_task(celery: Celery, settings: Settings, task_id: str, *, actor: str, only_owner: str | None = None) -> Task:
    """Cancel a task that has not finished.

    A queued task is marked CANCELLED, so whichever agent gets its message skips it at claim time,
    even after a restart; a running one is also revoked with terminate. A SCHEDULED one is only in the
    database: the state change is all it takes (beat moves only SCHEDULED rows, conditionally).
    """
    for _ in range(3):  # the state may move under us; re-read and try again
        with session_scope(settings.database) as session:
            task = get_task(session, task_id)
            check_owner(task, only_owner)
            current = TaskState(task.state)
            if current in TERMINAL:
                raise Conflict(
                    f"task {task_id} is already {current}; only unfinished tasks can be cancelled", state=current.value
                )
            if current not in CANCELLABLE:  # pragma: no cover - every non-terminal state is cancellable
                raise Conflict(f"a {current} task cannot be cancelled", state=current.value)
            moved = transition(
                session, task_id, current, TaskState.CANCELLED, actor=actor, detail={"reason": "cancel requested"}
            )
        if moved:
            if current is not TaskState.SCHEDULED:  # a SCHEDULED task has no message anywhere to revoke
                revoke(celery, task_id, terminate=current is TaskState.RUNNING)
            with session_scope(settings.database) as session:
                return get_task(session, task_id)
    raise Conflict(f"task {task_id} kept changing state; try again")


def retry_task(
    celery: Celery,
    settings: Settings,
    task_id: str,
    *,
    actor: str,
    only_owner: str | None = None,
    owner: str | None = None,
) -> Task:
    """Run a finished task again as a new task (``retry_of`` points back); the old one stays as it was."""
    with session_scope(settings.database) as session:
        old = get_task(session, task_id)
        check_owner(old, only_owner)
        if TaskState(old.state) not in RETRYABLE:
            allowed = ", ".join(sorted(s.value for s in RETRYABLE))
            raise Conflict(f"task {task_id} is {old.state}; only {allowed} tasks can be retried", state=old.state)
        spec = retry_spec(old, owner=owner)
    (new_id,) = create_tasks(celery, settings, [spec], actor=actor).ids
    with session_scope(settings.database) as session:
        return get_task(session, new_id)


def task_to_dict(
    task: Task, *, with_events: bool = False, reader: Reader | None = None, bodies: Collection[str] = BODY_FIELDS
) -> dict[str, Any]:
    """The task as the API shows it to ``reader`` (None: as an admin would see it), with the body fields
    in ``bodies`` (a list shows the others as previews: :func:`aios.tasks.view.add_previews`); a
    command's argv, env and output under :mod:`aios.tasks.view`'s rule."""
    data: dict[str, Any] = {
        "id": task.id,
        "type": task.type,
        "state": task.state,
        "priority": task.priority,
        "queue": task.queue,
        "attempts": task.attempts,
        "max_retries": task.max_retries,
        "timeout_s": task.timeout_s,
        "agent": task.agent,
        "retry_of": task.retry_of,
        "owner": task.owner,
        "routing": task.routing,
        "pinned_agent": task.pinned_agent,
        "on_agent_lost": task.on_agent_lost,
        "pending_reason": task.pending_reason,
        #: The latest progress the current run reported (0-100) and its message; null before any report.
        "progress": task.progress,
        "progress_message": task.progress_message,
        "created_at": isoformat(task.created_at),
        "updated_at": isoformat(task.updated_at),
        "queued_at": isoformat(task.queued_at),
        "started_at": isoformat(task.started_at),
        "finished_at": isoformat(task.finished_at),
        "run_at": isoformat(task.run_at),
    }
    for name in bodies:
        data[name] = getattr(task, name)
    redact(data, owner=task.owner, reader=reader or Reader(None, is_admin=True))
    if with_events:
        data["events"] = [
            {
                "id": event.id,
                "at": isoformat(event.at),
                "actor": event.actor,
                "from_state": event.from_state,
                "to_state": event.to_state,
                "detail": event.detail,
            }
            for event in task.events
        ]
    return data
