"""/api/v1/tasks: submit, batch submit, read, list and search, cancel, retry, bulk cancel and retry."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy.orm import Session

from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import Task
from aios.security.roles import ADMIN, OPERATOR, VIEWER
from aios.tasks.actions import cancel_task, get_task, retry_task, task_to_dict
from aios.tasks.bulk import BULK_DEFAULT_LIMIT, BULK_MAX, run_bulk
from aios.tasks.create import SubmitAudit, create_tasks
from aios.tasks.search import DEFAULT_SORT, SORTS, TaskFilter, check_q, encode_cursor, list_tasks
from aios.tasks.spec import TaskRequest, TaskSpec, check_pinned, to_spec
from aios.tasks.states import TaskState
from aios.tasks.view import BODY_FIELDS, add_previews, bodies_left_out, previews
from aios.tasktypes import get_registry
from aios.timeutil import parse_iso
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import audit_entry, audit_written, current_principal, policy, reader, set_audit

bp = Blueprint("tasks", __name__, url_prefix="/api/v1/tasks")

IDEMPOTENCY_KEY_MAX = 255


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    tasks: list[dict[str, Any]] = Field(min_length=1)


def _accepted(task_dict: dict[str, Any], *, replayed: bool = False) -> tuple[Response, int]:
    response = jsonify(task_dict)
    response.headers["Location"] = url_for("tasks.read", task_id=task_dict["id"])
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response, 202


def _actor() -> str:
    principal = current_principal()
    return f"api:{principal.name}" + (f" (key {principal.key_prefix})" if principal.key_prefix else "")


def list_items(session: Session, tasks: Sequence[Task], *, whole: Collection[str] = ()) -> list[dict[str, Any]]:
    """Tasks as a list shows them: the bodies in ``whole`` whole, the others as previews
    (:mod:`aios.tasks.view`); load ``tasks`` within :func:`aios.tasks.view.bodies_left_out`."""
    who = reader()
    items = [task_to_dict(task, reader=who, bodies=whole) for task in tasks]
    if len(whole) < len(BODY_FIELDS):
        shown = previews(session, [task.id for task in tasks])
        for item in items:
            add_previews(item, shown[item["id"]], whole=whole)
    return items


def _only_owner() -> str | None:
    """Operators may change only their own tasks; admins any."""
    principal = current_principal()
    return None if principal.role == ADMIN else principal.name


@bp.post("")
@policy(OPERATOR, audit_action="task.submit")
def submit() -> Any:
    """Accept one task. 202 means it is durably stored; it runs at least once."""
    context = ctx()
    body = validate(TaskRequest, json_body())
    spec = replace(to_spec(context.settings, body, idempotency_key=idempotency_key()), owner=current_principal().name)
    task_dict, created = accept(spec, audit_status=202)
    return _accepted(task_dict, replayed=not created)


def idempotency_key() -> str | None:
    """The request's Idempotency-Key header, if any (422 unless 1-255 characters)."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX:
        raise ValidationFailed(f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_MAX} characters", field="Idempotency-Key")
    return key


def accept(spec: TaskSpec, *, audit_status: int | None = None) -> tuple[dict[str, Any], bool]:
    """Store one task (or find the one an earlier request with its Idempotency-Key made), audit and
    count it, and dispatch it unless it waits SCHEDULED; returns the task as the API shows it and
    whether it was created. POST /tasks and POST /commands share it.

    With ``audit_status`` (the status the view will answer a new task with), the audit row is written
    in the task's own transaction (:func:`webapi.security.audit_written`)."""
    context = ctx()
    check_pinned(context.settings, spec)
    audit = _submit_audit(audit_status, names_task=True, type=spec.type, replayed=False)
    # Stored and dispatched in one commit; a SCHEDULED task is started by beat at its time.
    created = create_tasks(context.celery, context.settings, [spec], actor=_actor(), audit=audit)
    task = created.task()
    if audit is not None and audit_status is not None and created.replayed is None:
        audit_written(audit_status)
    set_audit(target=task.id, type=spec.type, replayed=created.replayed is not None)
    if created.replayed is None:
        from webapi.metrics import count_submitted

        count_submitted([spec.type])
    return task_to_dict(task, reader=reader()), created.replayed is None


def _submit_audit(status: int | None, *, names_task: bool = False, **detail: Any) -> SubmitAudit | None:
    """The request's audit row for :func:`aios.tasks.create.create_tasks` to write with the tasks, as
    answered with ``status`` (None: written after the response, as for any route)."""
    entry = None if status is None else audit_entry(status, **detail)
    return None if entry is None else SubmitAudit(entry, names_task=names_task)


@bp.post("/batch")
@policy(OPERATOR, audit_action="task.submit_batch")
def submit_batch() -> Any:
    """Accept up to ``api.batch_max_tasks`` tasks in one transaction: all are stored, or none."""
    context = ctx()
    settings = context.settings
    body = validate(BatchRequest, json_body())
    if len(body.tasks) > settings.api.batch_max_tasks:
        raise ValidationFailed(
            f"tasks: at most {settings.api.batch_max_tasks} tasks per batch (got {len(body.tasks)})", field="tasks"
        )
    owner = current_principal().name
    specs = [
        replace(
            to_spec(settings, validate(TaskRequest, item, prefix=f"tasks.{index}"), field_prefix=f"tasks.{index}"),
            owner=owner,
        )
        for index, item in enumerate(body.tasks)
    ]
    for index, spec in enumerate(specs):
        check_pinned(settings, spec, field=f"tasks.{index}.agent")

    audit = _submit_audit(202, count=len(specs))
    accepted = create_tasks(context.celery, settings, specs, actor=_actor(), audit=audit)
    if audit is not None:
        audit_written(202)
    set_audit(count=len(specs))
    ids = accepted.ids
    from webapi.metrics import count_submitted

    count_submitted([spec.type for spec in specs])
    queued, pending = len(accepted.outcome.queued), len(accepted.outcome.pending)
    return jsonify(
        {
            "ids": ids,
            "count": len(ids),
            "queued": queued,
            "pending": pending,
            "scheduled": len(ids) - queued - pending,
        }
    ), 202


@bp.get("/types")
@policy(VIEWER, OPERATOR)
def types() -> Any:
    """The task types this API accepts, with their description and parameter JSON schema."""
    registry = get_registry()
    return jsonify(
        {
            "types": [
                {
                    "name": name,
                    "description": registry.get(name).description,
                    "parameters": registry.get(name).parameters.model_json_schema(),
                }
                for name in registry.names()
            ]
        }
    )


@bp.get("/<task_id>")
@policy(VIEWER, OPERATOR)
def read(task_id: str) -> Any:
    with session_scope(ctx().settings.database) as session:
        return jsonify(task_to_dict(get_task(session, task_id, with_events=True), with_events=True, reader=reader()))


Name = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Sort = Literal[SORTS]  # type: ignore[valid-type]


class ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: str | None = None
    type: str | None = None
    priority: int | None = Field(None, ge=0, le=9)
    created_after: str | None = None
    created_before: str | None = None
    #: Case-insensitive substring of the type, parameters, result or error (aios.tasks.search); a
    #: command's parameters and result are not searched.
    q: str | None = None
    agent: Name | None = None
    schedule: Name | None = None
    owner: Name | None = None
    queue: Name | None = None
    sort: Sort = DEFAULT_SORT
    limit: int = Field(50, ge=1)
    cursor: str | None = None
    #: Body fields to show whole (a comma list of parameters, result, error); the others are previews.
    fields: str | None = None


def _fields(raw: str | None) -> frozenset[str]:
    if raw is None:
        return frozenset()
    fields = frozenset(f.strip() for f in raw.split(",") if f.strip())
    if not fields or not fields <= set(BODY_FIELDS):
        raise ValidationFailed(f"fields: use a comma list of {', '.join(BODY_FIELDS)}", field="fields")
    return fields


def _within_bytes(items: list[dict[str, Any]], max_bytes: int) -> int:
    """How many of ``items`` (at least one) fit in a page of ``max_bytes`` of JSON."""
    size = 0
    for count, item in enumerate(items):
        size += len(json.dumps(item, separators=(",", ":"))) + 1
        if count and size > max_bytes:
            return count
    return len(items)


@bp.get("")
@policy(VIEWER, OPERATOR)
def index() -> Any:
    """Newest first unless ``sort`` says otherwise; pass ``next_cursor`` back as ``cursor`` (with the
    same filter and sort) for the next page."""
    settings = ctx().settings
    repeated = [key for key in request.args if len(request.args.getlist(key)) > 1]
    if repeated:
        raise ValidationFailed(
            f"{repeated[0]}: given more than once; use one value (state takes a comma list)", field=repeated[0]
        )
    raw = request.args.to_dict(flat=True)
    query = validate(ListQuery, raw, prefix="")
    if query.limit > settings.api.page_max:
        raise ValidationFailed(f"limit: at most {settings.api.page_max}", field="limit")
    whole = _fields(query.fields)
    if whole and query.limit > settings.api.page_max_with_bodies:
        raise ValidationFailed(
            f"limit: at most {settings.api.page_max_with_bodies} with fields= "
            "(api.page_max_with_bodies); leave fields out for previews",
            field="limit",
        )
    where = TaskFilter(
        states=_states(query.state.split(",") if query.state else [], "state"),
        type=query.type,
        priority=query.priority,
        created_after=_time(query.created_after, "created_after"),
        created_before=_time(query.created_before, "created_before"),
        q=None if query.q is None else check_q(query.q),
        agent=query.agent,
        schedule=query.schedule,
        owner=query.owner,
        queue=query.queue,
    )
    with session_scope(settings.database) as session:
        with bodies_left_out(session, keep=whole):
            tasks, next_cursor = list_tasks(session, where, limit=query.limit, cursor=query.cursor, sort=query.sort)
        items = list_items(session, tasks, whole=whole)
    fitting = _within_bytes(items, settings.api.max_response_bytes)
    if fitting < len(items):
        items, next_cursor = items[:fitting], encode_cursor(tasks[fitting - 1], query.sort)
    return jsonify({"tasks": items, "next_cursor": next_cursor})


def _states(values: list[str], field: str) -> tuple[str, ...]:
    states = tuple(s.strip().upper() for s in values if s.strip())
    unknown = [s for s in states if s not in TaskState.__members__]
    if unknown:
        raise ValidationFailed(
            f"{field}: unknown state(s) {', '.join(unknown)}; use {', '.join(TaskState.__members__)}", field=field
        )
    return states


def _time(value: str | None, field: str) -> Any:
    if value is None:
        return None
    try:
        return parse_iso(value)
    except (ValueError, ValidationError) as exc:
        raise ValidationFailed(f"{field}: not an ISO 8601 time ({value!r})", field=field) from exc


@bp.delete("/<task_id>")
@policy(OPERATOR, audit_action="task.cancel")
def cancel(task_id: str) -> Any:
    context = ctx()
    task = cancel_task(context.celery, context.settings, task_id, actor=_actor(), only_owner=_only_owner())
    return jsonify(task_to_dict(task, reader=reader()))


@bp.post("/<task_id>/retry")
@policy(OPERATOR, audit_action="task.retry")
def retry(task_id: str) -> Any:
    """Run a finished (FAILED, DEAD, CANCELLED, TIMED_OUT) task again, as a new task."""
    context = ctx()
    task = retry_task(
        context.celery,
        context.settings,
        task_id,
        actor=_actor(),
        only_owner=_only_owner(),
        owner=current_principal().name,
    )
    set_audit(new_task=task.id)
    return _accepted(task_to_dict(task, reader=reader()))


class BulkFilter(BaseModel):
    """Which tasks a bulk action considers (all conditions AND); at least one must be given."""

    model_config = ConfigDict(extra="forbid", strict=True)

    state: list[Annotated[str, StringConstraints(min_length=1, max_length=16)]] | None = Field(None, max_length=16)
    type: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    priority: int | None = Field(None, ge=0, le=9)
    q: str | None = None
    agent: Name | None = None
    schedule: Name | None = None
    owner: Name | None = None
    queue: Name | None = None
    created_after: str | None = None
    created_before: str | None = None
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=36)]] | None = Field(
        None, min_length=1, max_length=BULK_MAX
    )


class BulkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal["cancel", "retry"]
    filter: BulkFilter
    #: Count and sample what would be done, and change nothing.
    dry_run: bool = False
    #: Refuse (409, nothing done) if the filter selects more tasks than this.
    limit: int = Field(BULK_DEFAULT_LIMIT, ge=1, le=BULK_MAX)


@bp.post("/bulk")
@policy(OPERATOR, audit_action="task.bulk")
def bulk() -> Any:
    """Cancel or retry every task a filter selects (operators: only their own). See aios.tasks.bulk."""
    context = ctx()
    body = validate(BulkRequest, json_body())
    given = body.filter
    where = TaskFilter(
        states=_states(given.state or [], "filter.state"),
        type=given.type,
        priority=given.priority,
        created_after=_time(given.created_after, "filter.created_after"),
        created_before=_time(given.created_before, "filter.created_before"),
        q=None if given.q is None else check_q(given.q, field="filter.q"),
        agent=given.agent,
        schedule=given.schedule,
        owner=given.owner,
        queue=given.queue,
        ids=tuple(dict.fromkeys(given.ids or ())),
    )
    audit_filter = {key: value for key, value in given.model_dump(exclude_none=True).items() if key != "ids"}
    if given.ids:
        audit_filter["ids"] = len(where.ids)
    set_audit(operation=body.action, dry_run=body.dry_run, filter=audit_filter, limit=body.limit)
    outcome = run_bulk(
        context.celery,
        context.settings,
        where,
        body.action,
        actor=_actor(),
        only_owner=_only_owner(),
        new_owner=current_principal().name,
        dry_run=body.dry_run,
        limit=body.limit,
    )
    set_audit(matched=outcome.matched, count=outcome.done, skipped=outcome.skipped)
    return jsonify(outcome.to_dict())
