"""Rows made and read straight in the ledger, for the API's security tests.

Tasks in any state, API keys and users are inserted with the application's own functions
(``create_tasks``, ``transition``, ``api_keys.generate``), not over HTTP, so a test can prepare the
object a call needs without that preparation showing up in the audit log it then checks.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from sqlalchemy import func, select

from aios.db import session_scope
from aios.models import ApiKey, AuditEntry, Task, TaskEvent, User
from aios.security import api_keys
from aios.security.passwords import hash_password
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.states import TaskState, transition
from aios.timeutil import utcnow

#: The password of every user made by :func:`make_plain_user` (hashed once: bcrypt 12 is slow).
PLAIN_PASSWORD = f"plain-{uuid.uuid4().hex}"

#: The state changes that bring a fresh PENDING task to each state a test may ask for.
_PATHS: dict[str, tuple[TaskState, ...]] = {
    "PENDING": (),
    "QUEUED": (TaskState.QUEUED,),
    "FAILED": (TaskState.QUEUED, TaskState.RUNNING, TaskState.FAILED),
    "SUCCEEDED": (TaskState.QUEUED, TaskState.RUNNING, TaskState.SUCCEEDED),
    "CANCELLED": (TaskState.CANCELLED,),
}


def user_id(stack: Any, name: str) -> int:
    with session_scope(stack.settings.database) as session:
        return int(session.scalars(select(User.id).where(User.name == name)).one())


@functools.cache
def _plain_hash() -> str:
    return hash_password(PLAIN_PASSWORD, cost=12)


def make_plain_user(stack: Any, role: str, *, prefix: str = "target") -> str:
    """A user with ``role`` and the password :data:`PLAIN_PASSWORD`, without a bcrypt run per user."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    now = utcnow()
    with session_scope(stack.settings.database) as session:
        session.add(
            User(name=name, password_hash=_plain_hash(), role=role, disabled=False, created_at=now, updated_at=now)
        )
    return name


def make_task(stack: Any, *, owner: str | None, queue: str, state: str) -> str:
    """A task owned by ``owner`` on ``queue``, moved through the state machine to ``state``.

    Nothing is published: the row is all the API's cancel, retry and read need.
    """
    spec = TaskSpec(type="echo", parameters={"n": 1}, priority=5, max_retries=0, timeout_s=60, queue=queue, owner=owner)
    (task_id,) = create_tasks(None, stack.settings, [spec], actor="test", publish=False).ids
    with session_scope(stack.settings.database) as session:
        current = TaskState.PENDING
        for target in _PATHS[state]:
            assert transition(session, task_id, current, target, actor="test")
            current = target
    return task_id


def task_snapshot(stack: Any, task_id: str) -> dict[str, Any]:
    """What a refused call must leave as it was: the row's state, its timeline and its retries."""
    with session_scope(stack.settings.database) as session:
        task = session.get(Task, task_id)
        assert task is not None
        return {
            "state": task.state,
            "owner": task.owner,
            "updated_at": task.updated_at,
            "events": session.scalar(select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task_id)),
            "retries": session.scalar(select(func.count()).select_from(Task).where(Task.retry_of == task_id)),
        }


def count_tasks(stack: Any, owner: str) -> int:
    with session_scope(stack.settings.database) as session:
        return int(session.scalar(select(func.count()).select_from(Task).where(Task.owner == owner)) or 0)


def new_key(stack: Any, *, owner_id: int, role: str, revoked: bool = False) -> tuple[str, str]:
    """An API key of ``owner_id`` (active, or revoked when asked): (its id, its plaintext)."""
    with session_scope(stack.settings.database) as session:
        new = api_keys.generate(
            session, name=f"k-{uuid.uuid4().hex[:6]}", role=role, owner_id=owner_id, expires_at=None
        )
        if revoked:
            new.row.state, new.row.revoked_at = api_keys.REVOKED, utcnow()
        return new.row.id, new.plaintext


def make_key(stack: Any, *, owner_id: int, role: str, revoked: bool = False) -> str:
    """Like :func:`new_key`; returns only the id."""
    return new_key(stack, owner_id=owner_id, role=role, revoked=revoked)[0]


def count_keys(stack: Any, owner_id: int) -> int:
    with session_scope(stack.settings.database) as session:
        return int(session.scalar(select(func.count()).select_from(ApiKey).where(ApiKey.owner_id == owner_id)) or 0)


def key_snapshot(stack: Any, key_id: str) -> dict[str, Any] | None:
    with session_scope(stack.settings.database) as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            return None
        return {
            "state": row.state,
            "expires_at": row.expires_at,
            "rotated_to": row.rotated_to,
            "revoked_at": row.revoked_at,
            "role": row.role,
        }


def user_snapshot(stack: Any, name: str) -> dict[str, Any] | None:
    with session_scope(stack.settings.database) as session:
        user = session.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            return None
        return {
            "role": user.role,
            "disabled": user.disabled,
            "password_hash": user.password_hash,
            "updated_at": user.updated_at,
        }


def last_audit_id(stack: Any) -> int:
    with session_scope(stack.settings.database) as session:
        return int(session.scalar(select(func.max(AuditEntry.id))) or 0)


def audit_rows_after(stack: Any, after_id: int) -> list[AuditEntry]:
    with session_scope(stack.settings.database) as session:
        return list(session.scalars(select(AuditEntry).where(AuditEntry.id > after_id).order_by(AuditEntry.id)))


def audit_rows(stack: Any, **where: Any) -> list[AuditEntry]:
    """Audit rows matching ``where`` (column = value), newest first."""
    with session_scope(stack.settings.database) as session:
        statement = select(AuditEntry).order_by(AuditEntry.id.desc())
        for column, value in where.items():
            statement = statement.where(getattr(AuditEntry, column) == value)
        return list(session.scalars(statement))
