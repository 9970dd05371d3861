"""The audit log: one row per write, login or control action, whatever its outcome."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from aios.models import AuditEntry
from aios.timeutil import utcnow

SUCCESS, DENIED, FAILURE = "success", "denied", "failure"


#: Built once: the parameters vary, the statement does not (so SQLAlchemy's compiled cache is hit cheaply).
_INSERT = insert(AuditEntry.__table__)


def outcome_for_status(status: int) -> str:
    if status < 400:
        return SUCCESS
    if status in (401, 403, 429):
        return DENIED
    return FAILURE


def record(
    session: Session,
    *,
    principal: str,
    role: str | None,
    source_ip: str | None,
    action: str,
    target: str | None,
    outcome: str,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """Append one audit row in the caller's transaction (a Core INSERT: no ORM object to flush)."""
    session.execute(
        _INSERT,
        {
            "at": utcnow(),
            "principal": principal[:128],
            "role": role,
            "source_ip": source_ip,
            "action": action,
            "target": (target or None) and target[:255],
            "outcome": outcome,
            "detail": dict(detail) if detail else None,
        },
    )


@dataclass(frozen=True)
class Entry:
    """One audit row as plain values, to be written in some transaction by whoever holds it.

    The web layer builds it from its request (principal, client address, the route's action and the
    status it answers with); code in the core that writes the row in its own transaction (task
    creation, :mod:`aios.tasks.create`) takes it as it is and never reads the request.
    """

    principal: str
    role: str | None
    source_ip: str | None
    action: str
    target: str | None
    outcome: str
    detail: Mapping[str, Any] | None = None

    def write(self, session: Session, *, target: str | None = None) -> None:
        """Append this row (about ``target`` instead, if given) in the session's transaction."""
        record(
            session,
            principal=self.principal,
            role=self.role,
            source_ip=self.source_ip,
            action=self.action,
            target=self.target if target is None else target,
            outcome=self.outcome,
            detail=self.detail,
        )
