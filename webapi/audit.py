"""/api/v1/audit: the audit log (admin), newest first, keyset-paginated."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import AuditEntry
from aios.security.roles import ADMIN
from aios.timeutil import isoformat, parse_iso
from webapi.context import ctx
from webapi.requests import validate
from webapi.security import policy

bp = Blueprint("audit", __name__, url_prefix="/api/v1/audit")


class AuditQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    principal: str | None = None
    action: str | None = None
    outcome: str | None = None
    since: str | None = None
    limit: int = Field(100, ge=1, le=1000)
    cursor: int | None = Field(None, ge=1)


def entry_to_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "at": isoformat(entry.at),
        "principal": entry.principal,
        "role": entry.role,
        "source_ip": entry.source_ip,
        "action": entry.action,
        "target": entry.target,
        "outcome": entry.outcome,
        "detail": entry.detail,
    }


@bp.get("")
@policy(ADMIN)
def index() -> Any:
    raw = request.args.to_dict(flat=True)
    query = validate(AuditQuery, raw)
    statement = select(AuditEntry)
    if query.principal:
        statement = statement.where(AuditEntry.principal == query.principal)
    if query.action:
        statement = statement.where(AuditEntry.action == query.action)
    if query.outcome:
        statement = statement.where(AuditEntry.outcome == query.outcome)
    if query.since:
        try:
            since = parse_iso(query.since)
        except ValueError as exc:
            raise ValidationFailed(f"since: not an ISO 8601 time ({query.since!r})", field="since") from exc
        statement = statement.where(AuditEntry.at >= since)
    if query.cursor:
        statement = statement.where(AuditEntry.id < query.cursor)
    statement = statement.order_by(AuditEntry.id.desc()).limit(query.limit + 1)
    with session_scope(ctx().settings.database) as session:
        entries = list(session.scalars(statement))
    more = len(entries) > query.limit
    entries = entries[: query.limit]
    return jsonify(
        {
            "entries": [entry_to_dict(e) for e in entries],
            "next_cursor": str(entries[-1].id) if more and entries else None,
        }
    )
