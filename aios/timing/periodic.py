"""Periodic tasks: schedules stored in the database, fired by the beat leader.

A schedule fires every ``interval_s`` seconds or on a 5-field ``cron`` expression (UTC). Each firing
creates an ordinary task linked to its schedule. Firing a slot is one conditional UPDATE of the
schedule's ``last_slot_at`` in the same transaction as the task's INSERT, so a slot never fires
twice — not with two beats, not across a change of leader. Slots missed while no beat ran are not
replayed one by one: the latest missed slot fires once, then the schedule carries on.

Edits through the API change ``next_run_at`` at once; the leader reads the table every tick, so a
change takes effect within one tick, without restarting beat.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from aios.config import Settings
from aios.db import session_scope
from aios.errors import Forbidden, NotFound
from aios.models import Schedule
from aios.tasks.create import BeforeCommit, create_tasks, dispatch
from aios.tasks.spec import TaskSpec
from aios.timeutil import as_utc, utcnow
from aios.timing.cron import next_cron_time

logger = logging.getLogger(__name__)

#: Most schedules fired per tick (bounded work).
FIRE_LIMIT = 200


def next_run(schedule: Schedule, after: datetime) -> datetime:
    if schedule.interval_s:
        return after + timedelta(seconds=schedule.interval_s)
    return next_cron_time(schedule.cron or "", after)


def first_run(interval_s: int | None, cron: str | None, now: datetime) -> datetime:
    if interval_s:
        return now + timedelta(seconds=interval_s)
    return next_cron_time(cron or "", now)


def fire_due(celery: Celery, settings: Settings, spec_for: Any, *, now: datetime | None = None) -> list[str]:
    """Fire every enabled schedule whose ``next_run_at`` has come; returns the created task ids.

    ``spec_for(schedule) -> TaskSpec`` turns the stored task body into a validated spec (the API's
    own validation, so a schedule's task is checked like any submitted task).
    """
    now = now or utcnow()
    with session_scope(settings.database) as session:
        due = list(
            session.scalars(
                select(Schedule)
                .where(Schedule.enabled.is_(True), Schedule.next_run_at <= now)
                .order_by(Schedule.next_run_at)
                .limit(FIRE_LIMIT)
            )
        )
    created: list[str] = []
    for schedule in due:
        slot = as_utc(schedule.next_run_at)
        following = next_run(schedule, slot)  # type: ignore[arg-type]
        while following <= now:  # beat was away: skip to the latest missed slot, fire it once
            slot, following = following, next_run(schedule, following)
        try:
            spec: TaskSpec = spec_for(schedule)
        except Exception as exc:  # noqa: BLE001 - a broken schedule must not stop the others
            logger.error("schedule %s (%s) has an invalid task: %s", schedule.name, schedule.id, exc)
            continue
        try:
            (task_id,) = create_tasks(
                celery,
                settings,
                [replace(spec, schedule_id=schedule.id)],
                actor=f"schedule:{schedule.name}",
                before_commit=_fire_slot(schedule.id, slot, following, now),
                publish=False,  # all of a tick's slots are published together, below
            ).ids
        except _SlotTaken:
            continue  # another beat fired this slot, or it was edited meanwhile
        created.append(task_id)
    if created:
        dispatch(celery, settings, created, actor="beat")
    return created


class _SlotTaken(Exception):
    """The slot was fired by another beat, or the schedule changed meanwhile: its task is not created."""


def _fire_slot(schedule_id: str, slot: datetime | None, following: datetime, now: datetime) -> BeforeCommit:
    """The step that fires ``slot`` in its task's transaction: one conditional UPDATE of the schedule, which
    only one beat can win; the loser's task is rolled back with it (:class:`_SlotTaken`)."""

    def fire(session: Session, rows: list[dict[str, Any]]) -> None:
        won = session.execute(
            update(Schedule)
            .where(
                Schedule.id == schedule_id,
                Schedule.enabled.is_(True),
                or_(Schedule.last_slot_at.is_(None), Schedule.last_slot_at < slot),
            )
            .values(last_slot_at=slot, next_run_at=following, updated_at=now, last_task_id=rows[0]["id"])
            .returning(Schedule.id)
        ).first()
        if won is None:
            raise _SlotTaken(schedule_id)

    return fire


def new_schedule_id() -> str:
    return str(uuid.uuid4())


def set_enabled(settings: Settings, schedule_id: str, enabled: bool, *, only_owner: str | None = None) -> Schedule:
    """Pause or resume a schedule; a resumed one counts its next run from now (no burst of missed slots).

    With ``only_owner`` set the schedule must be theirs (operators change only their own).
    """
    with session_scope(settings.database) as session:
        row = session.get(Schedule, schedule_id)
        if row is None:
            raise NotFound(f"no schedule with id {schedule_id!r}", field="id")
        if only_owner is not None and row.owner != only_owner:
            raise Forbidden(f"schedule {schedule_id} belongs to another user; only its owner or an admin may change it")
        now = utcnow()
        if enabled and not row.enabled:
            row.next_run_at = first_run(row.interval_s, row.cron, now)
        row.enabled, row.updated_at = enabled, now
        session.flush()
        session.expunge(row)
        return row
