"""Scheduled tasks: submitted with ``run_at`` or ``delay_s``, held in the database until their time.

A task whose time is in the future is stored ``SCHEDULED`` with its ``run_at`` and nothing is
published. The beat leader's short tick calls :func:`dispatch_due`, which moves the tasks whose
time came ``SCHEDULED → PENDING`` and dispatches them like freshly submitted ones; a task therefore
starts within about one ``beat.tick_s`` of its time.

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
import math
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import select

from aios.config import Settings
from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import Task
from aios.tasks.states import TaskState, transition_many
from aios.timeutil import as_utc, isoformat, utcnow

logger = logging.getLogger(__name__)

#: The furthest ahead a task may be scheduled (``delay_s`` or ``run_at``); use a schedule beyond that.
MAX_AHEAD_S = 366 * 86_400
#: Longest ``run_at`` text accepted (an ISO 8601 time with fractions and an offset fits in 40).
RUN_AT_MAX_CHARS = 64


def parse_run_at(text: str, *, field: str = "run_at") -> datetime:
    """Parse an ISO 8601 time that names its zone (``Z`` or ``±HH:MM``); return it in UTC.

    A time without a zone is refused: guessing the submitter's zone would start the task hours off.
    """
    if len(text) > RUN_AT_MAX_CHARS:
        raise ValidationFailed(f"{field}: at most {RUN_AT_MAX_CHARS} characters", field=field)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValidationFailed(
            f"{field}: not an ISO 8601 time ({text!r}); use e.g. 2030-01-31T09:00:00Z", field=field
        ) from exc
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValidationFailed(
            f"{field}: {text!r} has no time zone; add Z (UTC) or an offset such as +02:00", field=field
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError as exc:  # 0001-01-01T00:00+01:00 has no UTC time
        raise ValidationFailed(f"{field}: {text!r} is outside the range of UTC times", field=field) from exc


def requested_run_at(
    run_at: str | None,
    delay_s: float | None,
    *,
    now: datetime | None = None,
    field_prefix: str = "",
) -> datetime | None:
    """Check a request's timing fields; return its ``run_at`` parsed (UTC), or None if it gave none.

    At most one of ``run_at`` and ``delay_s`` may be given, and neither may reach more than
    :data:`MAX_AHEAD_S` ahead (use a schedule for that). A ``run_at`` in the past is accepted: the
    task simply runs at once (see :func:`hold_until`).
    """
    prefix = f"{field_prefix}." if field_prefix else ""
    if run_at is not None and delay_s is not None:
        raise ValidationFailed(f"{prefix}delay_s: give run_at or delay_s, not both", field=f"{prefix}delay_s")
    if delay_s is not None:
        if not math.isfinite(delay_s) or not 0 <= delay_s <= MAX_AHEAD_S:
            raise ValidationFailed(
                f"{prefix}delay_s: must be between 0 and {MAX_AHEAD_S} (366 days)", field=f"{prefix}delay_s"
            )
        return None
    if run_at is None:
        return None
    when = parse_run_at(run_at, field=f"{prefix}run_at")
    now = now or utcnow()
    if when - now > timedelta(seconds=MAX_AHEAD_S):
        latest = isoformat(now + timedelta(seconds=MAX_AHEAD_S))
        raise ValidationFailed(f"{prefix}run_at: at most 366 days ahead (before {latest})", field=f"{prefix}run_at")
    return when


def hold_until(run_at: datetime | None, delay_s: float | None, *, now: datetime) -> datetime | None:
    """When a task stored at ``now`` is due, if that is still in the future; None means dispatch it now.

    ``delay_s`` counts from the moment the task is stored, so ``run_at - created_at == delay_s`` exactly.
    """
    when = now + timedelta(seconds=delay_s) if delay_s is not None else as_utc(run_at)
    return when if when is not None and when > now else None


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
        from aios.tasks.create import dispatch  # here: aios.tasks.create imports this module

        outcome = dispatch(celery, settings, started, actor="beat")
        logger.info(
            "started %d scheduled task(s): %d queued, %d left pending",
            len(started),
            len(outcome.queued),
            len(outcome.pending),
        )
    return started
