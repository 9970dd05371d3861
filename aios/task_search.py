"""Finding tasks in the ledger: the filter, the sort orders, and the keyset cursor that pages through them.

Shared by the list endpoint and bulk actions (:mod:`aios.bulk`), so "the tasks this filter selects"
means the same thing to both. Every page costs one ordered index scan plus the filter; no OFFSET.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Text, and_, cast, func, or_, select
from sqlalchemy.orm import Session

from aios.errors import ValidationFailed
from aios.models import Task
from aios.timeutil import isoformat, parse_iso

#: Bounds of a search text: one character matches nearly everything; a long one is a mistake.
Q_MIN, Q_MAX = 2, 200
#: The sort orders of the list; a leading "-" is descending. Ties break on created_at, then id.
SORTS = ("-created_at", "created_at", "-priority", "priority", "-updated_at", "updated_at")
DEFAULT_SORT = "-created_at"


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks: every field given narrows the set (AND); an empty filter selects every task."""

    states: tuple[str, ...] = ()
    type: str | None = None
    priority: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    #: Case-insensitive substring of the type, the parameters or result (as JSON text), or the error.
    q: str | None = None
    #: The agent that ran the task or the one it is pinned to (agent names are Celery hostnames).
    agent: str | None = None
    #: The periodic schedule that created it.
    schedule: str | None = None
    owner: str | None = None
    queue: str | None = None
    ids: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not any(
            (self.states, self.type, self.priority is not None, self.created_after, self.created_before, self.q,
             self.agent, self.schedule, self.owner, self.queue, self.ids)
        )


def check_q(q: str, *, field: str = "q") -> str:
    if not Q_MIN <= len(q) <= Q_MAX:
        raise ValidationFailed(f"{field}: search text must be {Q_MIN}-{Q_MAX} characters (got {len(q)})", field=field)
    return q


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, with its own %, _ and \\ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def apply_filter(statement: Select[Any], where: TaskFilter, *, dialect: str) -> Select[Any]:
    """Add ``where``'s conditions to a SELECT over tasks."""
    if where.states:
        statement = statement.where(Task.state.in_(where.states))
    if where.type:
        statement = statement.where(Task.type == where.type)
    if where.priority is not None:
        statement = statement.where(Task.priority == where.priority)
    if where.created_after:
        statement = statement.where(Task.created_at > where.created_after)
    if where.created_before:
        statement = statement.where(Task.created_at < where.created_before)
    if where.agent:
        statement = statement.where(or_(Task.agent == where.agent, Task.pinned_agent == where.agent))
    if where.schedule:
        statement = statement.where(Task.schedule_id == where.schedule)
    if where.owner:
        statement = statement.where(Task.owner == where.owner)
    if where.queue:
        statement = statement.where(Task.queue == where.queue)
    if where.ids:
        statement = statement.where(Task.id.in_(where.ids))
    if where.q:
        plain = _like(where.q)
        # The JSON columns are matched as their stored text, where a string's " and \ are escaped (and,
        # on SQLite, non-ASCII letters are \u escapes): look for the text as JSON would spell it.
        as_json = _like(json.dumps(where.q, ensure_ascii=dialect == "sqlite")[1:-1])
        statement = statement.where(or_(
            Task.type.ilike(plain, escape="\\"),
            func.coalesce(Task.error, "").ilike(plain, escape="\\"),
            cast(Task.parameters, Text).ilike(as_json, escape="\\"),
            func.coalesce(cast(Task.result, Text), "").ilike(as_json, escape="\\"),
        ))
    return statement


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def count_tasks(session: Session, where: TaskFilter) -> int:
    statement = apply_filter(select(func.count()).select_from(Task), where, dialect=_dialect(session))
    return int(session.scalar(statement) or 0)


# --------------------------------------------------------------------------- sort and cursor


def _key_columns(sort: str) -> list[Any]:
    """The keyset of a sort: its field, then created_at, then id (unique), all in the same direction."""
    name = sort.lstrip("-")
    columns = [getattr(Task, name)] + ([Task.created_at] if name != "created_at" else [])
    return [*columns, Task.id]


def _key_values(task: Task, sort: str) -> list[Any]:
    return [getattr(task, column.key) for column in _key_columns(sort)]


def encode_cursor(task: Task, sort: str = DEFAULT_SORT) -> str:
    """The position just after ``task`` in ``sort`` order, safe in a URL.

    The default sort keeps its original form ``[created_at, id]`` (cursors handed out before sorting
    existed stay valid); any other sort names itself, so a cursor cannot be followed in another order.
    """
    values = [isoformat(v) if isinstance(v, datetime) else v for v in _key_values(task, sort)]
    payload: Any = values if sort == DEFAULT_SORT else {"sort": sort, "key": values}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _decode_key(sort: str, values: Any) -> list[Any]:
    columns = _key_columns(sort)
    if not isinstance(values, list) or len(values) != len(columns):
        raise ValueError("a cursor key has one value per sort column")
    decoded: list[Any] = []
    for column, value in zip(columns, values, strict=True):
        if column.key == "id":
            if not isinstance(value, str) or "\x00" in value:
                raise ValueError("the task id of a cursor is a string without NUL characters")
            decoded.append(value)
        elif column.key == "priority":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError("a priority is an integer")
            decoded.append(value)
        else:
            if not isinstance(value, str):
                raise ValueError("a time is an ISO 8601 string")
            decoded.append(parse_iso(value))
    return decoded


def decode_sorted_cursor(cursor: str, sort: str) -> list[Any]:
    """The key values of a cursor this API issued for ``sort``; 422 for any other text."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise ValidationFailed("cursor is not one this API returned", field="cursor") from exc
    issued_for = DEFAULT_SORT if isinstance(payload, list) else (
        payload.get("sort") if isinstance(payload, dict) else None)
    if issued_for in SORTS and issued_for != sort:
        raise ValidationFailed(f"cursor was issued for sort={issued_for}, not sort={sort}; "
                               "start again without a cursor to change the order", field="cursor")
    try:
        if issued_for != sort or (isinstance(payload, dict) and set(payload) != {"sort", "key"}):
            raise ValueError("not a cursor")
        return _decode_key(sort, payload if isinstance(payload, list) else payload["key"])
    except (ValueError, TypeError) as exc:
        raise ValidationFailed("cursor is not one this API returned", field="cursor") from exc


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A default-sort (newest first) cursor as ``(created_at, id)``."""
    created_at, task_id = decode_sorted_cursor(cursor, DEFAULT_SORT)
    return created_at, task_id


def _after(sort: str, values: Sequence[Any]) -> Any:
    """Rows strictly after ``values`` in ``sort`` order: (a, b, c) > (x, y, z), spelled out so every
    database (and its index on the leading column) takes it."""
    descending = sort.startswith("-")
    columns = _key_columns(sort)
    alternatives = []
    for index, column in enumerate(columns):
        equal = [columns[i] == values[i] for i in range(index)]
        beyond = column < values[index] if descending else column > values[index]
        alternatives.append(and_(*equal, beyond))
    return or_(*alternatives)


def list_tasks(session: Session, where: TaskFilter, *, limit: int, cursor: str | None,
               sort: str = DEFAULT_SORT) -> tuple[list[Task], str | None]:
    """One page in ``sort`` order (newest first by default) and the cursor of the next page, if any."""
    if sort not in SORTS:
        raise ValidationFailed(f"sort: must be one of {', '.join(SORTS)} (got {sort!r})", field="sort")
    statement = apply_filter(select(Task), where, dialect=_dialect(session))
    if cursor:
        statement = statement.where(_after(sort, decode_sorted_cursor(cursor, sort)))
    columns = _key_columns(sort)
    order = [c.desc() for c in columns] if sort.startswith("-") else [c.asc() for c in columns]
    tasks = list(session.scalars(statement.order_by(*order).limit(limit + 1)))
    next_cursor = encode_cursor(tasks[limit - 1], sort) if len(tasks) > limit else None
    return tasks[:limit], next_cursor
