"""/api/v1/schedules: periodic tasks, stored in the database, fired by the beat leader."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from aios.db import session_scope
from aios.errors import Conflict, Forbidden, NotFound, ValidationFailed
from aios.models import Schedule
from aios.security.roles import ADMIN, OPERATOR, VIEWER
from aios.tasks.spec import TaskRequest, schedule_body, to_spec
from aios.tasks.view import redact
from aios.timeutil import isoformat, utcnow
from aios.timing.cron import parse_cron
from aios.timing.periodic import first_run, new_schedule_id
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, reader, set_audit

bp = Blueprint("schedules", __name__, url_prefix="/api/v1/schedules")

ScheduleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class CreateSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: ScheduleName
    cron: str | None = Field(None, max_length=128)
    interval_s: int | None = Field(None, ge=1, le=366 * 86_400)
    task: dict[str, Any]
    enabled: bool = True


class UpdateSchedule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: ScheduleName | None = None
    cron: str | None = Field(None, max_length=128)
    interval_s: int | None = Field(None, ge=1, le=366 * 86_400)
    task: dict[str, Any] | None = None
    enabled: bool | None = None


def stored_task(body: dict[str, Any]) -> dict[str, Any]:
    """Validate a schedule's task like a submitted one; store the resolved spec."""
    request = validate(TaskRequest, body, prefix="task")
    spec = to_spec(ctx().settings, request, field_prefix="task")
    if getattr(request, "run_at", None) is not None or getattr(request, "delay_s", None) is not None:
        raise ValidationFailed("task: a schedule's task cannot have run_at or delay_s", field="task")
    return schedule_body(spec)


def check_timing(cron: str | None, interval_s: int | None) -> None:
    if (cron is None) == (interval_s is None):
        raise ValidationFailed("give exactly one of cron and interval_s", field="cron" if cron else "interval_s")
    if cron is not None:
        parse_cron(cron)


def schedule_to_dict(row: Schedule) -> dict[str, Any]:
    """The schedule as the caller may see it: a command's task body under aios.tasks.view's rule."""
    task = redact(dict(row.task), owner=row.owner, reader=reader())
    hidden = {"redacted": True} if task.pop("redacted", False) else {}
    return {
        "id": row.id,
        "name": row.name,
        "cron": row.cron,
        "interval_s": row.interval_s,
        "task": task,
        **hidden,
        "enabled": row.enabled,
        "owner": row.owner,
        "last_run_at": isoformat(row.last_slot_at),
        "next_run_at": isoformat(row.next_run_at) if row.enabled else None,
        "last_task_id": row.last_task_id,
        "created_at": isoformat(row.created_at),
        "updated_at": isoformat(row.updated_at),
    }


def _get(session: Session, schedule_id: str) -> Schedule:
    row = session.get(Schedule, schedule_id)
    if row is None:
        raise NotFound(f"no schedule with id {schedule_id!r}", field="id")
    return row


def _get_to_change(session: Session, schedule_id: str) -> Schedule:
    """As for tasks, operators change only their own schedules; admins any."""
    row = _get(session, schedule_id)
    principal = current_principal()
    if principal.role != ADMIN and row.owner != principal.name:
        raise Forbidden(f"schedule {schedule_id} belongs to another user; only its owner or an admin may change it")
    return row


@bp.post("")
@policy(OPERATOR, audit_action="schedule.create")
def create() -> Any:
    body = validate(CreateSchedule, json_body())
    check_timing(body.cron, body.interval_s)
    task = stored_task(body.task)
    now = utcnow()
    row = Schedule(
        id=new_schedule_id(),
        name=body.name,
        cron=body.cron,
        interval_s=body.interval_s,
        task=task,
        enabled=body.enabled,
        owner=current_principal().name,
        created_at=now,
        updated_at=now,
        next_run_at=first_run(body.interval_s, body.cron, now),
    )
    set_audit(target=row.id, name=body.name)
    try:
        with session_scope(ctx().settings.database) as session:
            session.add(row)
    except IntegrityError as exc:
        raise Conflict(f"a schedule named {body.name!r} exists", field="name") from exc
    return jsonify(schedule_to_dict(row)), 201


@bp.get("")
@policy(VIEWER, OPERATOR)
def index() -> Any:
    with session_scope(ctx().settings.database) as session:
        rows = session.scalars(select(Schedule).order_by(Schedule.name)).all()
        return jsonify({"schedules": [schedule_to_dict(r) for r in rows]})


@bp.get("/<schedule_id>")
@policy(VIEWER, OPERATOR)
def read(schedule_id: str) -> Any:
    with session_scope(ctx().settings.database) as session:
        return jsonify(schedule_to_dict(_get(session, schedule_id)))


@bp.patch("/<schedule_id>")
@policy(OPERATOR, audit_action="schedule.update")
def update(schedule_id: str) -> Any:
    """Change timing, task, name or enabled; a new timing counts from now, effective at the next tick."""
    body = validate(UpdateSchedule, json_body())
    set_audit(changed=sorted(body.model_dump(exclude_none=True)))
    task = stored_task(body.task) if body.task is not None else None
    now = utcnow()
    try:
        with session_scope(ctx().settings.database) as session:
            row = _get_to_change(session, schedule_id)
            timing_changed = body.cron is not None or body.interval_s is not None
            if timing_changed:
                row.cron, row.interval_s = body.cron, body.interval_s
                check_timing(row.cron, row.interval_s)
            if body.name is not None:
                row.name = body.name
            if task is not None:
                row.task = task
            if body.enabled is not None:
                row.enabled = body.enabled
            if timing_changed or body.enabled:
                row.next_run_at = first_run(row.interval_s, row.cron, now)
            row.updated_at = now
            session.flush()
            return jsonify(schedule_to_dict(row))
    except IntegrityError as exc:
        raise Conflict(f"a schedule named {body.name!r} exists", field="name") from exc


@bp.delete("/<schedule_id>")
@policy(OPERATOR, audit_action="schedule.delete")
def delete(schedule_id: str) -> Any:
    with session_scope(ctx().settings.database) as session:
        session.delete(_get_to_change(session, schedule_id))
    return jsonify({"deleted": schedule_id})
