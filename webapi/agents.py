"""/api/v1/agents: register, list, read, drain/disable/enable, delete.

The original system's two agent calls work as it documented them: ``POST /agents`` with a ``type`` and
no name (AIOS names the agent and keeps the type as a capability) and ``PUT /agents/{id}`` with one of
its statuses (mapped to AIOS's by :func:`aios.agents.registry.admin_status_for`). docs/api.md has the table.
"""

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
from aios.timeutil import isoformat
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, set_audit
from webapi.tasks import list_items

bp = Blueprint("agents", __name__, url_prefix="/api/v1/agents")

AgentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,254}$")]
Capability = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class RegisterAgent(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: Generated when left out: ``<type>-<6 hex>`` (``<key's user>@<type>-<6 hex>`` for an agent key).
    name: AgentName | None = Field(None, description="generated when left out: <type>-<6 hex>, or agent-<6 hex>")
    #: The original system's agent type: stored, shown, and kept among the capabilities (routes as one).
    type: Capability | None = Field(None, description="the agent's type; also one of its capabilities")
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


class SetAgentStatus(BaseModel):
    """The original system's ``PUT /agents/{id}``: only its status, in its words or AIOS's."""

    model_config = ConfigDict(extra="forbid", strict=True)
    #: IDLE (= ONLINE), OFFLINE or ERROR (= DISABLED), or AIOS's ONLINE, DRAINING, DISABLED. BUSY and
    #: DEGRADED are 409: AIOS computes them from heartbeats. Checked by the view, so each refusal says why.
    status: str = Field(
        description="IDLE (enable: ONLINE), OFFLINE or ERROR (disable: DISABLED), or ONLINE, DRAINING, "
        "DISABLED; BUSY and DEGRADED are refused with 409 (AIOS computes them from heartbeats)",
        json_schema_extra={"examples": list(agent_ledger.SETTABLE_STATUSES)},
    )


def agent_to_dict(agent: Agent) -> dict[str, Any]:
    return {
        "name": agent.name,
        "type": agent.type,
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
    as_agent = principal.role == AGENT
    if body.name is not None:
        set_audit(target=body.name)
        if as_agent and not body.name.startswith(f"{principal.name}@") and body.name != principal.name:
            raise Forbidden(f"an agent key of {principal.name!r} may register only agents named {principal.name}@…")
    settings = ctx().settings
    with session_scope(settings.database) as session:
        name = body.name or agent_ledger.new_agent_name(session, body.type, owner=principal.name if as_agent else None)
        set_audit(target=name, **({"type": body.type} if body.type else {}))
        agent, _ = agent_ledger.register(
            session,
            agent_ledger.AgentSpec(
                name=name,
                capabilities=body.capabilities,
                labels=body.labels,
                weight=body.weight,
                max_concurrency=body.max_concurrency,
                type=body.type,
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
    # The audit detail's "status" is the HTTP status: the agent's goes under another key.
    set_audit(target=name, **{("agent_status" if k == "status" else k): v for k, v in changes.items()})
    return _change(name, agent_ledger.AgentChange(**body.model_dump()))


@bp.put("/<path:name>")
@policy(OPERATOR, audit_action="agent.update")
def set_status(name: str) -> Any:
    """The original system's status call: IDLE enables the agent (ONLINE), OFFLINE or ERROR disable it
    (DISABLED); AIOS's ONLINE, DRAINING and DISABLED work too. BUSY is refused (409): AIOS computes it."""
    body = validate(SetAgentStatus, json_body())
    set_audit(target=name, agent_status=body.status)  # as sent ("status" is the HTTP status's key)
    admin_status = agent_ledger.admin_status_for(body.status)
    set_audit(admin_status=admin_status)
    return _change(name, agent_ledger.AgentChange(status=admin_status))


def _change(name: str, change: agent_ledger.AgentChange) -> Any:
    """Apply an operator's change (:func:`aios.agents.registry.change_agent`) and answer with the agent."""
    settings = ctx().settings
    with session_scope(settings.database) as session:
        result = agent_to_dict(agent_ledger.change_agent(session, settings, name, change))
    agent_ledger.forget_healthy_cache()
    # Drained or disabled: it takes no new work, so what waits in its queue goes to other agents.
    admin_status_changed(settings, ctx().celery, name, change.status)
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
