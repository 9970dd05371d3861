"""/api/v1/system: the API host's resources, every agent's last figures, and the system limits."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from sqlalchemy import select

from aios.db import session_scope
from aios.models import Agent
from aios.ops import limits
from aios.ops.resources import resource_figures
from aios.security.roles import OPERATOR, VIEWER
from aios.timeutil import isoformat
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, set_audit

bp = Blueprint("system", __name__, url_prefix="/api/v1/system")


@bp.get("/resources")
@policy(VIEWER, OPERATOR)
def resources() -> Any:
    """psutil figures of the host answering this request, and each agent's from its last heartbeat."""
    settings = ctx().settings
    with session_scope(settings.database) as session:
        rows = session.execute(
            select(Agent.name, Agent.status, Agent.last_heartbeat_at, Agent.resources).order_by(Agent.name)
        ).all()
    return jsonify(
        {
            "api": resource_figures("."),
            "agents": [
                {
                    "name": row.name,
                    "status": row.status,
                    "last_heartbeat_at": isoformat(row.last_heartbeat_at),
                    "resources": row.resources or {},
                }
                for row in rows
            ],
        }
    )


def _limits_answer(session: Any) -> dict[str, Any]:
    settings = ctx().settings
    return {
        "limits": limits.current(session, settings).model_dump(),
        "defaults": limits.defaults(settings),
        "overridden": sorted(limits.overrides(session)),
    }


@bp.get("/limits")
@policy(VIEWER, OPERATOR)
def read_limits() -> Any:
    with session_scope(ctx().settings.database) as session:
        return jsonify(_limits_answer(session))


@bp.put("/limits")
@policy(audit_action="system.limits")
def change_limits() -> Any:
    """Admin only. Any subset of the limits; ``null`` puts one back to the config's default. Agents
    apply new thresholds at their next heartbeat."""
    body = validate(limits.LimitsChange, json_body())
    set_audit(changed=body.model_dump(exclude_unset=True))
    with session_scope(ctx().settings.database) as session:
        limits.change(session, ctx().settings, body, actor=current_principal().name)
        session.flush()
        return jsonify(_limits_answer(session))
