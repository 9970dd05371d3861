"""/api/v1/agents: register, list, read, drain/disable/enable, delete."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy import select

from aios.agents import registry as agent_ledger
from aios.agents.health import AgentStatus
from aios.db import session_scope
from aios.errors import Conflict, Forbidden, ValidationFailed
from aios.models import Agent, AgentEvent, Task
from aios.recovery.reroute import admin_status_changed
from aios.security.roles import AGENT, OPERATOR, VIEWER
from aios.tasks.states import TaskState
from aios.tasks.view import bodies_left_out
from aios.timeutil import isoformat, utcnow
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, set_audit
from webapi.tasks import list_items

bp = Blueprint("agents", __name__, url_prefix="/api/v1/agents")

AgentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,254}$")]
Capability = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class RegisterAgent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: AgentName
    capabilities: list[Capability] = Field(default_factory=list, max_length=256)
    labels: dict[str, str] = Field(default_factory=dict)
    weight: int = Field(1, ge=1, le=1000)
    max_concurrency: int = Field(1, ge=1, le=10_000)


class UpdateAgent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: DRAINING (finish current work, take no new), DISABLED, or ONLINE (back to normal).
    status: Literal["ONLINE", "DRAINING", "DISABLED"] | None = None
    weight: int | None = Field(None, ge=1, le=1000)
    capabilities: list[Capability] | None = Field(None, max_length=256)
    labels: dict[str, str] | None = None


def agent_to_dict(agent: Agent) -> dict[str, Any]:
    return {
        "name": agent.name,
        "status": agent.status,
        "status_reason": agent.status_reason,
        "admin_status": agent.admin_status,
        "capabilities": agent.capabilities,
        "labels": agent.labels,
        "weight": agent.weight,
        "max_concurrency": agent.max_concurrency,
        "last_heartbeat_at": isoformat(agent.last_heartbeat_at),
        "resources": agent.resources,
        "active": agent.active,
        "processed": agent.processed,
        "registered_at": isoformat(agent.registered_at),
        "updated_at": isoformat(agent.updated_at),
    }


@bp.post("")
@policy(OPERATOR, AGENT, audit_action="agent.register")
def register() -> Any:
    """Register a placeholder for an agent ahead of its first heartbeat (an `agent` key may register only
    itself). Placeholders never take a place from an agent that starts (``aios.agents.registry.register``)."""
    principal = current_principal()
    body = validate(RegisterAgent, json_body())
    set_audit(target=body.name)
    if principal.role == AGENT and not body.name.startswith(f"{principal.name}@") and body.name != principal.name:
        raise Forbidden(f"an agent key of {principal.name!r} may register only agents named {principal.name}@…")
    settings = ctx().settings
    with session_scope(settings.database) as session:
        agent, _ = agent_ledger.register(
            session,
            agent_ledger.AgentSpec(
                name=body.name,
                capabilities=body.capabilities,
                labels=body.labels,
                weight=body.weight,
                max_concurrency=body.max_concurrency,
            ),
            max_agents=settings.orchestrator.max_agents,
            live=False,
        )
        return jsonify(agent_to_dict(agent)), 201


@bp.get("")
@policy(VIEWER, OPERATOR)
def index() -> Any:
    raw = request.args.to_dict(flat=True)
    unknown = set(raw) - {"status", "capability"}
    if unknown:
        raise ValidationFailed(f"{sorted(unknown)[0]}: unknown query parameter", field=sorted(unknown)[0])
    statement = select(Agent).order_by(Agent.name)
    if raw.get("status"):
        statuses = [s.strip().upper() for s in raw["status"].split(",") if s.strip()]
        bad = [s for s in statuses if s not in AgentStatus.__members__]
        if bad:
            raise ValidationFailed(f"status: unknown status {bad[0]}; use {', '.join(AgentStatus)}", field="status")
        statement = statement.where(Agent.status.in_(statuses))
    with session_scope(ctx().settings.database) as session:
        rows = list(session.scalars(statement))
    capability = raw.get("capability")
    if capability:
        rows = [row for row in rows if capability in (row.capabilities or [])]
    return jsonify({"agents": [agent_to_dict(row) for row in rows]})


@bp.get("/<path:name>")
@policy(VIEWER, OPERATOR)
def read(name: str) -> Any:
    """The agent, its active tasks, its recent tasks and its recent status changes."""
    with session_scope(ctx().settings.database) as session:
        agent = agent_ledger.get_agent(session, name)
        with bodies_left_out(session):
            active = session.scalars(
                select(Task).where(Task.agent == name, Task.state == TaskState.RUNNING.value).order_by(Task.started_at)
            ).all()
            recent = session.scalars(
                select(Task).where(Task.agent == name).order_by(Task.updated_at.desc()).limit(20)
            ).all()
        events = session.scalars(
            select(AgentEvent).where(AgentEvent.agent == name).order_by(AgentEvent.id.desc()).limit(20)
        ).all()
        return jsonify(
            {
                **agent_to_dict(agent),
                "active_tasks": list_items(session, active),
                "recent_tasks": list_items(session, recent),
                "events": [
                    {"at": isoformat(e.at), "from_status": e.from_status, "to_status": e.to_status, "reason": e.reason}
                    for e in events
                ],
            }
        )


@bp.patch("/<path:name>")
@policy(OPERATOR, audit_action="agent.update")
def update(name: str) -> Any:
    """Drain, disable or re-enable an agent, or change its weight, capabilities or labels."""
    body = validate(UpdateAgent, json_body())
    changes = body.model_dump(exclude_none=True)
    set_audit(target=name, **changes)
    settings = ctx().settings
    with session_scope(settings.database) as session:
        agent = agent_ledger.get_agent(session, name)
        if body.status is not None:
            agent.admin_status = "ACTIVE" if body.status == "ONLINE" else body.status
        if body.weight is not None:
            agent.weight = body.weight
        if body.capabilities is not None:
            agent.capabilities = sorted(set(body.capabilities))
        if body.labels is not None:
            agent.labels = body.labels
        agent.updated_at = utcnow()
        agent_ledger.reevaluate(session, settings, agent)
        result = agent_to_dict(agent)
    agent_ledger.forget_healthy_cache()
    # Drained or disabled: it takes no new work, so what waits in its queue goes to other agents.
    admin_status_changed(settings, ctx().celery, name, body.status)
    return jsonify(result)


@bp.delete("/<path:name>")
@policy(audit_action="agent.delete")
def delete(name: str) -> Any:
    """Forget an agent that is OFFLINE (admin)."""
    with session_scope(ctx().settings.database) as session:
        agent = agent_ledger.get_agent(session, name)
        if agent.status != AgentStatus.OFFLINE.value:
            raise Conflict(
                f"agent {name!r} is {agent.status}; only an OFFLINE agent can be deleted", agent_status=agent.status
            )
        session.delete(agent)
    agent_ledger.forget_healthy_cache()
    return jsonify({"deleted": name})
