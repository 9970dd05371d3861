"""Scheduled tasks: submitted with ``run_at`` or ``delay_s``, held in the database until their time.

A task whose time is in the future is stored ``SCHEDULED`` with its ``run_at`` and nothing is
published (:func:`aios.tasks.create.create_tasks`; what ``run_at`` and ``delay_s`` accept, and when a
task is held, is in :mod:`aios.tasks.spec`). The beat leader's short tick calls :func:`dispatch_due`,
which moves the tasks whose time came ``SCHEDULED → PENDING`` and dispatches them like freshly
submitted ones; a task therefore starts within about one ``beat.tick_s`` of its time.

Why not Celery's ``eta``/``countdown``: on Redis an ETA message is delivered at once and sits
unacknowledged in the worker's memory until its time; once that exceeds ``visibility_timeout`` Redis
hands the same message to another worker, and again every timeout, so one scheduled task is held
(and would run) several times (kombu#337, celery "Redis caveats"). Holding it in the database keeps
the broker free of it until it is due, makes it cancellable with a plain state change (no revoke
that a restarted worker would forget), and survives broker restarts.

Times are compared with this host's UTC clock; API and beat hosts should run NTP.
"""

from __future__ import annotations

import logging
from datetime import datetime

from celery import Celery
from sqlalchemy import select

from aios.config import Settings
from aios.db import session_scope
from aios.models import Task
from aios.tasks.create import dispatch
from aios.tasks.states import TaskState, transition_many
from aios.timeutil import utcnow

logger = logging.getLogger(__name__)


def dispatch_due(celery: Celery, settings: Settings, *, now: datetime | None = None, limit: int = 1000) -> list[str]:
    """Start the SCHEDULED tasks whose ``run_at`` has come, oldest first, at most ``limit`` per call.

    Each task moves ``SCHEDULED → PENDING`` in one conditional UPDATE before anything is published,
    so two callers (two beats during a change of leader) never both take one, and a task cancelled
    meanwhile stays cancelled. The moved tasks are then dispatched; any that cannot be published
    stay PENDING, where ``dispatch-pending`` and the sync job find them. Returns the ids moved.
    The lookup uses the ``(state, run_at)`` index ``ix_tasks_state_run_at``.
    """
    now = now or utcnow()
    with session_scope(settings.database) as session:
        due = list(
            session.scalars(
                select(Task.id)
                .where(Task.state == TaskState.SCHEDULED.value, Task.run_at <= now)
                .order_by(Task.run_at, Task.id)
                .limit(limit)
            )
        )
        if not due:
            return []
        moved = set(
            transition_many(
                session, due, TaskState.SCHEDULED, TaskState.PENDING, actor="beat", detail={"reason": "run_at reached"}
            )
        )
    started = [task_id for task_id in due if task_id in moved]
    if started:
        outcome = dispatch(celery, settings, started, actor="beat")
        logger.info(
            "started %d scheduled task(s): %d queued, %d left pending",
            len(started),
            len(outcome.queued),
            len(outcome.pending),
        )
    return started
