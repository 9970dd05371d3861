"""Cancel or retry every task a filter selects, in one request.

The selection is a :class:`aios.tasks.search.TaskFilter` intersected with the states the action applies
to (cancel: CANCELLABLE, retry: RETRYABLE) and, for a non-admin, with the caller's own tasks, so a bulk
action never reaches further than the same action done task by task. A selection larger than ``limit``
is refused as a whole (nothing is changed) rather than cut at an arbitrary row: the caller narrows the
filter or raises the limit, and knows exactly what was done. A dry run counts the same selection.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from aios.config import Settings
from aios.db import session_scope
from aios.errors import Conflict, Forbidden, ValidationFailed
from aios.models import Task
from aios.tasks.create import create_tasks
from aios.tasks.search import TaskFilter, apply_filter, count_tasks
from aios.tasks.spec import retry_spec
from aios.tasks.states import CANCELLABLE, RETRYABLE, TaskState, transition_many

logger = logging.getLogger(__name__)

Action = Literal["cancel", "retry"]
#: The most tasks one request may act on (the ``limit`` of a request is at most this).
BULK_MAX = 10_000
BULK_DEFAULT_LIMIT = 1_000
SAMPLE_SIZE = 20
#: Rows per UPDATE / revoke broadcast: keeps statements and control messages small on any database.
_CHUNK = 500
_ACTIONABLE: dict[str, frozenset[TaskState]] = {"cancel": CANCELLABLE, "retry": RETRYABLE}


@dataclass
class BulkOutcome:
    action: str
    dry_run: bool
    limit: int
    #: Tasks the filter selects that the action applies to (and the caller may act on).
    matched: int
    #: The first ids (oldest first, the order a run takes them in).
    sample_ids: list[str]
    done: int = 0
    #: Why some matched tasks were left as they were: reason -> count.
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "action": self.action,
            "dry_run": self.dry_run,
            "limit": self.limit,
            "matched": self.matched,
            "sample_ids": self.sample_ids,
        }
        if not self.dry_run:
            data.update(done=self.done, skipped=self.skipped)
        return data


def selection(where: TaskFilter, action: Action, *, only_owner: str | None) -> TaskFilter:
    """The filter narrowed to what ``action`` applies to and the caller may touch; 422 for an empty
    filter (a bulk action never means "every task" by accident)."""
    if where.is_empty():
        raise ValidationFailed(
            "filter: give at least one condition (an empty filter would select every task)", field="filter"
        )
    actionable = _ACTIONABLE[action]
    wrong = [state for state in where.states if state not in actionable]
    if wrong:
        allowed = ", ".join(sorted(s.value for s in actionable))
        raise ValidationFailed(
            f"filter.state: {', '.join(wrong)} tasks cannot be {action}ed; {action} applies to {allowed}",
            field="filter.state",
        )
    states = where.states or tuple(sorted(s.value for s in actionable))
    owner = where.owner
    if only_owner is not None:
        if owner is not None and owner != only_owner:
            raise Forbidden(f"filter.owner: you may act only on your own tasks (owner {only_owner!r})")
        owner = only_owner
    return replace(where, states=states, owner=owner)


def _oldest_first(session: Session, where: TaskFilter, limit: int) -> list[Any]:
    statement = apply_filter(select(Task.id, Task.state), where, dialect=session.get_bind().dialect.name)
    return list(session.execute(statement.order_by(Task.created_at, Task.id).limit(limit)))


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def run_bulk(
    celery: Celery,
    settings: Settings,
    where: TaskFilter,
    action: Action,
    *,
    actor: str,
    only_owner: str | None,
    new_owner: str | None,
    dry_run: bool,
    limit: int = BULK_DEFAULT_LIMIT,
) -> BulkOutcome:
    """Dry run: count and sample the selection, change nothing. Otherwise act on all of it (409 and no
    change if it holds more than ``limit`` tasks)."""
    if not 1 <= limit <= BULK_MAX:
        raise ValidationFailed(f"limit: must be 1-{BULK_MAX} (got {limit})", field="limit")
    chosen = selection(where, action, only_owner=only_owner)
    with session_scope(settings.database) as session:
        if dry_run:
            matched = count_tasks(session, chosen)
            sample = [row.id for row in _oldest_first(session, chosen, SAMPLE_SIZE)]
            return BulkOutcome(action, True, limit, matched, sample)
        rows = _oldest_first(session, chosen, limit + 1)
        if len(rows) > limit:
            matched = count_tasks(session, chosen)
            raise Conflict(
                f"the filter selects {matched} tasks to {action}, more than limit ({limit}); narrow "
                f"the filter (state, type, created_before, ...) or raise limit (at most {BULK_MAX})",
                matched=matched,
                limit=limit,
            )
    outcome = BulkOutcome(action, False, limit, len(rows), [row.id for row in rows[:SAMPLE_SIZE]])
    if action == "cancel":
        _cancel(celery, settings, rows, outcome, actor=actor)
    else:
        _retry(celery, settings, [row.id for row in rows], outcome, actor=actor, new_owner=new_owner)
    return outcome


def _cancel(celery: Celery, settings: Settings, rows: list[Any], outcome: BulkOutcome, *, actor: str) -> None:
    """What :func:`aios.tasks.actions.cancel_task` does, for many tasks: conditional moves grouped by the state
    each was read in (a task that moved meanwhile is re-read, twice at most), then one revoke per chunk."""
    current = {row.id: TaskState(row.state) for row in rows}
    moved_from: dict[str, TaskState] = {}
    for _ in range(3):
        by_state: dict[TaskState, list[str]] = defaultdict(list)
        for task_id, state in current.items():
            by_state[state].append(task_id)
        with session_scope(settings.database) as session:
            for state, ids in by_state.items():
                for chunk in _chunks(ids):
                    for task_id in transition_many(
                        session,
                        chunk,
                        state,
                        TaskState.CANCELLED,
                        actor=actor,
                        detail={"reason": "cancel requested", "bulk": True},
                    ):
                        moved_from[task_id] = state
            left = [task_id for task_id in current if task_id not in moved_from]
            reread = {
                task_id: TaskState(state)
                for chunk in _chunks(left)
                for task_id, state in session.execute(select(Task.id, Task.state).where(Task.id.in_(chunk)))
            }
        current = {task_id: state for task_id, state in reread.items() if state in CANCELLABLE}
        if not current:
            break
    outcome.done = len(moved_from)
    not_done = len(rows) - outcome.done
    if not_done:
        outcome.skipped["finished_meanwhile"] = not_done - len(current)
        if current:
            outcome.skipped["kept_changing_state"] = len(current)
    outcome.skipped = {reason: n for reason, n in outcome.skipped.items() if n}
    for terminate in (False, True):  # a SCHEDULED task has no message anywhere to revoke
        ids = [
            task_id
            for task_id, state in moved_from.items()
            if state is not TaskState.SCHEDULED and (state is TaskState.RUNNING) == terminate
        ]
        for chunk in _chunks(ids):
            _revoke(celery, list(chunk), terminate=terminate)


def _revoke(celery: Celery, task_ids: list[str], *, terminate: bool) -> None:
    """Best effort, as for one task: the CANCELLED row is what makes an agent skip a queued copy."""
    try:
        celery.control.revoke(task_ids, terminate=terminate, signal="SIGTERM")
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not broadcast revoke of %d tasks: %s", len(task_ids), exc)


def _retry(
    celery: Celery, settings: Settings, task_ids: list[str], outcome: BulkOutcome, *, actor: str, new_owner: str | None
) -> None:
    """What :func:`aios.tasks.actions.retry_task` does, for many tasks: every new task (``retry_of`` pointing
    back) is created in one transaction, then they are published together (one
    :func:`aios.tasks.create.create_tasks`). The old tasks are finished (a terminal state never changes),
    so none can move out of the selection meanwhile."""
    with session_scope(settings.database) as session:
        old = [task for chunk in _chunks(task_ids) for task in session.scalars(select(Task).where(Task.id.in_(chunk)))]
        old.sort(key=lambda task: (task.created_at, task.id))
        specs = [retry_spec(task, owner=new_owner) for task in old]
    new_ids = create_tasks(celery, settings, specs, actor=actor).ids
    outcome.done = len(new_ids)
    if len(new_ids) < len(task_ids):
        outcome.skipped["gone"] = len(task_ids) - len(new_ids)
