"""/api/v1/workers: live inspection and remote control of workers (Flower's worker API).

Everything here asks the workers over the broker right now (``aios.broker.inspection``), bounded by
``api.inspect_timeout_s``. Reading is for every role, but a viewer does not see host details
(:func:`for_viewer`: process ids, the broker connection, the Celery ``conf``); control is for
operators and admins, and each control call is audited as ``worker.<action>``. Worker names contain
``@`` (``gpu-01@host``): it needs no escaping in a path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from aios.broker import inspection as inspect
from aios.broker.celery_app import RUN_TASK_NAME, queue_name
from aios.errors import Forbidden, ValidationFailed
from aios.security.roles import OPERATOR, VIEWER
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, set_audit

bp = Blueprint("workers", __name__, url_prefix="/api/v1/workers")

#: An AIOS queue: a named queue, ``agent.<name>`` or ``cap.<capability>``.
QueueName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")]
TaskName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,254}$")]
#: Celery's rate syntax: tasks per second, or per s/m/h; "0" turns the limit off.
RATE = re.compile(r"^\d+(\.\d+)?(/[smh])?$")


def optional_body(model: type[BaseModel]) -> Any:
    """The JSON body validated by ``model``; an empty body counts as ``{}`` (all defaults). Also for
    other blueprints' POSTs that take no fields (:class:`NoFields`): anything sent is a 422."""
    return validate(model, json_body() if request.content_length or request.get_data(cache=True) else {})


#: Fields a viewer may not ask for: ``conf`` is the worker's whole Celery configuration (paths,
#: hosts, transport options).
OPERATOR_FIELDS = frozenset({"conf"})
#: What a viewer does not see of ``stats``: the worker's pid, its pool's pids and the broker
#: connection (host, port, user, transport options).
VIEWER_HIDDEN_STATS = ("pid", "broker")
#: Task lists whose entries carry the pid of the pool process running them (``worker_pid``).
TASK_LISTS = ("active", "reserved", "scheduled")


def _sees_host_details() -> bool:
    return current_principal().role != VIEWER


def _fields() -> list[str]:
    host_details = _sees_host_details()
    allowed = [f for f in inspect.INSPECT_FIELDS if host_details or f not in OPERATOR_FIELDS]
    raw = request.args.get("fields")
    if raw is None:
        return allowed
    fields = [f.strip() for f in raw.split(",") if f.strip()]
    unknown = [f for f in fields if f not in inspect.INSPECT_FIELDS]
    if unknown or not fields:
        raise ValidationFailed(f"fields: use a comma list of {', '.join(inspect.INSPECT_FIELDS)}", field="fields")
    hidden = [f for f in fields if f not in allowed]
    if hidden:
        raise Forbidden(f"fields: {', '.join(hidden)} is shown to operators and admins only; leave it out")
    return fields


def for_viewer(worker: dict[str, Any]) -> dict[str, Any]:
    """``worker`` without its host details: process ids (``stats.pid``, ``stats.pool.processes``, each
    task's ``worker_pid``) and ``stats.broker``. Counts and states stay."""
    shown = dict(worker)
    stats = shown.get("stats")
    if isinstance(stats, dict):
        stats = {key: value for key, value in stats.items() if key not in VIEWER_HIDDEN_STATS}
        if isinstance(stats.get("pool"), dict):
            stats["pool"] = {key: value for key, value in stats["pool"].items() if key != "processes"}
        shown["stats"] = stats
    for field in TASK_LISTS:
        if isinstance(shown.get(field), list):
            shown[field] = [_without_pid(entry) for entry in shown[field]]
    return shown


def _without_pid(entry: Any) -> Any:
    if not isinstance(entry, dict):
        return entry
    # A scheduled entry wraps its task in "request".
    return {
        key: _without_pid(value) if key == "request" else value for key, value in entry.items() if key != "worker_pid"
    }


def _shown(worker: dict[str, Any]) -> dict[str, Any]:
    return worker if _sees_host_details() else for_viewer(worker)


@bp.get("")
@policy(VIEWER, OPERATOR)
def index() -> Any:
    """Every worker that answers a ping, with ``stats``, ``active``, ``reserved``, ``scheduled``,
    ``revoked``, ``registered``, ``active_queues`` and ``conf`` (or the ``fields`` asked for); a
    viewer gets no ``conf`` and no host details."""
    context = ctx()
    workers = inspect.describe_workers(context.celery, context.settings, fields=_fields())
    return jsonify({"workers": [_shown(workers[name]) for name in sorted(workers)]})


@bp.get("/<name>")
@policy(VIEWER, OPERATOR)
def read(name: str) -> Any:
    context = ctx()
    return jsonify(_shown(inspect.describe_worker(context.celery, context.settings, name, fields=_fields())))


def _control(name: str, command: str, arguments: dict[str, Any] | None = None, **audit: Any) -> Any:
    context = ctx()
    set_audit(target=name, **audit)
    answer = inspect.control(context.celery, context.settings, name, command, arguments)
    return jsonify({"worker": name, "command": command, "ok": answer})


class NoFields(BaseModel):
    """The body of a POST that takes no fields: empty or ``{}``; any field is ``unknown field``."""

    model_config = ConfigDict(extra="forbid")


class PoolSize(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: Pool processes to add or remove.
    n: int = Field(1, ge=1, le=256)


class Autoscale(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    max: int = Field(ge=1, le=256)
    min: int = Field(ge=0, le=256)

    @model_validator(mode="after")
    def _ordered(self) -> Autoscale:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class Consumer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    queue: QueueName


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: The Celery task; every AIOS task type runs as aios.run, so that is the default.
    task: TaskName = RUN_TASK_NAME
    #: "10/m", "2/s", "100/h" or a number per second; null or "0" removes the limit.
    rate_limit: str | None

    @model_validator(mode="after")
    def _rate(self) -> RateLimit:
        if self.rate_limit is not None and not RATE.match(self.rate_limit):
            raise ValueError(f"rate_limit must look like 10/m, 2/s, 100/h or 5 (got {self.rate_limit!r})")
        return self


class TimeLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    task: TaskName = RUN_TASK_NAME
    #: Seconds; null removes that limit.
    soft_s: float | None = Field(None, gt=0, le=30 * 86_400)
    hard_s: float | None = Field(None, gt=0, le=30 * 86_400)

    @model_validator(mode="after")
    def _ordered(self) -> TimeLimit:
        if self.soft_s is not None and self.hard_s is not None and self.soft_s > self.hard_s:
            raise ValueError(f"soft_s ({self.soft_s:g}) must not exceed hard_s ({self.hard_s:g})")
        return self


@bp.post("/<name>/pool/grow")
@policy(OPERATOR, audit_action="worker.pool_grow")
def pool_grow(name: str) -> Any:
    body = optional_body(PoolSize)
    return _control(name, "pool_grow", {"n": body.n}, n=body.n)


@bp.post("/<name>/pool/shrink")
@policy(OPERATOR, audit_action="worker.pool_shrink")
def pool_shrink(name: str) -> Any:
    body = optional_body(PoolSize)
    return _control(name, "pool_shrink", {"n": body.n}, n=body.n)


@bp.post("/<name>/pool/autoscale")
@policy(OPERATOR, audit_action="worker.pool_autoscale")
def pool_autoscale(name: str) -> Any:
    """Change the autoscale range; a worker started without ``agents.autoscale_max`` refuses (409)."""
    body = optional_body(Autoscale)
    return _control(name, "autoscale", {"max": body.max, "min": body.min}, max=body.max, min=body.min)


@bp.post("/<name>/pool/restart")
@policy(OPERATOR, audit_action="worker.pool_restart")
def pool_restart(name: str) -> Any:
    """Replace every pool process once it has finished its current task (nothing is reloaded)."""
    optional_body(NoFields)
    return _control(name, "pool_restart", {"modules": [], "reload": False})


@bp.post("/<name>/queues/add-consumer")
@policy(OPERATOR, audit_action="worker.add_consumer")
def add_consumer(name: str) -> Any:
    """Make the worker consume an AIOS queue too (until it restarts: its start options win then)."""
    return _consumer_control(name, "add_consumer")


@bp.post("/<name>/queues/cancel-consumer")
@policy(OPERATOR, audit_action="worker.cancel_consumer")
def cancel_consumer(name: str) -> Any:
    return _consumer_control(name, "cancel_consumer")


def _consumer_control(name: str, command: str) -> Any:
    """add_consumer / cancel_consumer take the AIOS queue name; Celery wants the broker's."""
    body = optional_body(Consumer)
    return _control(name, command, {"queue": queue_name(ctx().settings, body.queue)}, queue=body.queue)


@bp.post("/<name>/rate-limit")
@policy(OPERATOR, audit_action="worker.rate_limit")
def rate_limit(name: str) -> Any:
    """Celery's per-task rate limit on this worker (all AIOS types share the task ``aios.run``)."""
    body = optional_body(RateLimit)
    limit = None if body.rate_limit in (None, "0") else body.rate_limit  # Celery: None turns it off
    return _control(
        name, "rate_limit", {"task_name": body.task, "rate_limit": limit}, task=body.task, rate_limit=body.rate_limit
    )


@bp.post("/<name>/time-limit")
@policy(OPERATOR, audit_action="worker.time_limit")
def time_limit(name: str) -> Any:
    """Celery's default time limits for a task on this worker; a message's own limits (every AIOS
    task carries its ``timeout_s``) still win."""
    body = optional_body(TimeLimit)
    return _control(
        name,
        "time_limit",
        {"task_name": body.task, "soft": body.soft_s, "hard": body.hard_s},
        task=body.task,
        soft_s=body.soft_s,
        hard_s=body.hard_s,
    )


@bp.post("/<name>/shutdown")
@policy(OPERATOR, audit_action="worker.shutdown")
def shutdown(name: str) -> Any:
    """Warm shutdown: running tasks finish, prefetched messages go back to the broker. 202: asked."""
    optional_body(NoFields)
    context = ctx()
    set_audit(target=name)
    inspect.shutdown(context.celery, context.settings, name)
    return jsonify({"worker": name, "command": "shutdown", "ok": "shutdown requested"}), 202
