"""The spec of a new task: what a request asks for, validated, with the defaults applied.

Every task is created from a :class:`TaskSpec` (:func:`aios.tasks.create.create_tasks`). The API's
body (:class:`TaskRequest`) becomes one through :func:`to_spec`, which checks the type's parameters
and the timing fields; a retry's spec is copied from the task it repeats (:func:`retry_spec`); a
schedule stores part of one as its task body (:func:`schedule_body`) and beat turns it back into a
spec each time it fires. Nothing here reads a web request: the API passes the body and the header
values it read.

A task submitted with ``run_at`` or ``delay_s`` is held in the database until its time
(:mod:`aios.timing.delayed` starts it); the rules for those two fields are here, with the other fields'.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from aios.config import Settings
from aios.errors import Conflict, ValidationFailed
from aios.tasktypes import get_registry
from aios.timeutil import as_utc, isoformat, utcnow

if TYPE_CHECKING:
    from aios.models import Task

#: The furthest ahead a task may be scheduled (``delay_s`` or ``run_at``); use a schedule beyond that.
MAX_AHEAD_S = 366 * 86_400
#: Longest ``run_at`` text accepted (an ISO 8601 time with fractions and an offset fits in 40).
RUN_AT_MAX_CHARS = 64


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
    #: The periodic schedule that fired it (aios.timing.periodic).
    schedule_id: str | None = None


QueueName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class TaskRequest(BaseModel):
    """The body of POST /tasks (and each item of a batch). Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    parameters: dict[str, Any] = Field(default_factory=dict)
    priority: int | None = Field(None, ge=0, le=9, description="0-9, 9 most urgent")
    max_retries: int | None = Field(None, ge=0, le=100)
    timeout_s: int | None = Field(None, ge=1)
    queue: QueueName | None = None
    #: Routing policy for this task (default orchestrator.routing_policy); exclusive with queue and agent.
    routing: Literal["round_robin", "weighted_round_robin", "least_loaded", "shared"] | None = None
    #: Pin the task to one agent (409 unless it is healthy and can run the type).
    agent: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    #: A RUNNING task whose agent goes OFFLINE is retried (an attempt) or failed.
    on_agent_lost: Literal["retry", "fail"] | None = None
    #: Start at this time (ISO 8601 with Z or an offset) or this many seconds after submission; the task
    #: waits SCHEDULED in the database until then (aios.timing.delayed). A time not in the future runs at once.
    run_at: str | None = None
    delay_s: float | None = Field(None, ge=0, le=MAX_AHEAD_S, allow_inf_nan=False)


def to_spec(
    settings: Settings, body: TaskRequest, *, field_prefix: str = "", idempotency_key: str | None = None
) -> TaskSpec:
    """Turn a validated body into a TaskSpec, applying defaults and checking the type's parameters."""
    prefix = f"{field_prefix}." if field_prefix else ""
    orchestrator = settings.orchestrator
    if body.timeout_s is not None and body.timeout_s > orchestrator.task_timeout_s:
        raise ValidationFailed(
            f"{prefix}timeout_s: must be at most orchestrator.task_timeout_s ({orchestrator.task_timeout_s})",
            field=f"{prefix}timeout_s",
        )
    chosen = [name for name in ("queue", "agent", "routing") if getattr(body, name) is not None]
    if len(chosen) > 1:
        raise ValidationFailed(
            f"{prefix}{chosen[1]}: give only one of queue, agent and routing", field=f"{prefix}{chosen[1]}"
        )
    run_at = requested_run_at(body.run_at, body.delay_s, field_prefix=field_prefix)
    registry = get_registry()
    try:
        task_type = registry.get(body.type)
        params = task_type.validate(body.parameters)
    except ValidationFailed as exc:
        field = f"{prefix}{exc.extra.get('field', 'parameters')}"
        raise type(exc)(f"{field_prefix}: {exc.message}" if field_prefix else exc.message, field=field) from exc
    return TaskSpec(
        type=body.type,
        parameters=params.model_dump(mode="json"),
        priority=orchestrator.default_priority if body.priority is None else body.priority,
        max_retries=orchestrator.max_retries if body.max_retries is None else body.max_retries,
        timeout_s=body.timeout_s or orchestrator.task_timeout_s,
        queue=body.queue or "",
        idempotency_key=idempotency_key,
        routing="queue" if body.queue else ("pinned" if body.agent else body.routing or orchestrator.routing_policy),
        pinned_agent=body.agent,
        on_agent_lost=body.on_agent_lost or "retry",
        run_at=run_at,
        delay_s=body.delay_s,
    )


def check_pinned(settings: Settings, spec: TaskSpec, *, field: str = "agent") -> None:
    """A task pinned to an agent is refused (409) unless that agent is healthy and can run it."""
    if spec.pinned_agent is None:
        return
    from aios.agents.registry import forget_healthy_cache, healthy_agents

    forget_healthy_cache()
    for candidate in healthy_agents(settings):
        if candidate.name == spec.pinned_agent:
            if spec.type in candidate.capabilities:
                return
            raise Conflict(f"agent {spec.pinned_agent!r} cannot run tasks of type {spec.type!r}", field=field)
    raise Conflict(f"agent {spec.pinned_agent!r} is not a healthy agent", field=field)


#: What a retry does not copy from the task it runs again: that task's key, timing, schedule and lineage.
NOT_REPEATED = frozenset({"idempotency_key", "retry_of", "owner", "run_at", "delay_s", "schedule_id"})


def retry_spec(old: Task, *, owner: str | None = None) -> TaskSpec:
    """The spec of a new task that runs ``old`` again (``retry_of`` points back), owned by ``owner``
    (default: ``old``'s owner). Every other field of the spec is copied from ``old``."""
    repeated = {name: getattr(old, name) for name in (f.name for f in fields(TaskSpec)) if name not in NOT_REPEATED}
    return TaskSpec(**repeated, retry_of=old.id, owner=owner or old.owner)


#: The fields of a spec a schedule stores as its task body; beat turns them back into a TaskSpec.
SCHEDULE_FIELDS = (
    "type",
    "parameters",
    "priority",
    "max_retries",
    "timeout_s",
    "queue",
    "routing",
    "pinned_agent",
    "on_agent_lost",
)


def schedule_body(spec: TaskSpec) -> dict[str, Any]:
    """What a schedule stores of ``spec`` (its :data:`SCHEDULE_FIELDS`)."""
    data = asdict(spec)
    return {name: data[name] for name in SCHEDULE_FIELDS}


# --------------------------------------------------------------------------- run_at and delay_s


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
