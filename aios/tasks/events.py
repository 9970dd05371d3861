"""Task and agent events read as ordered, resumable feeds (what the API's event streams serve).

Two feeds, both plain polling of the database (no broker, no LISTEN/NOTIFY: they work the same on the
embedded SQLite default and on PostgreSQL, across any number of API processes):

* :class:`TaskFeed`: one task's ``task_events`` rows, after a given id, until the task has ended and
  everything was read. One indexed query per poll (``ix_task_events_task``: ``task_id = ? AND id > ?``).
  A task's state changes and progress reports are written under its row lock (a conditional UPDATE of
  the task first), so they commit in id order and a simple ``id > last`` cursor misses none of them.
* :class:`ClusterFeed`: every task event and agent event, filtered, merged in time order. Rows of
  different tasks and agents are written by concurrent transactions, so ids can become visible out of
  order (id 101 commits before id 100). The feed therefore never moves its watermark past a missing id
  while that id may still be in flight: it holds what comes after the gap until the gap fills, for at
  most :data:`GAP_WAIT_S` (a rolled-back transaction leaves a permanent gap). Events are thus delivered
  in id order per table and a watermark is an exact resume point.

Each poll opens and closes its own session: no database connection is held between polls.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aios.config import Settings
from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import AgentEvent, Task, TaskEvent
from aios.tasks.states import TERMINAL, TaskState
from aios.timeutil import isoformat, utcnow

#: Longest time a feed holds events back behind a missing id that may belong to a transaction not yet
#: committed; a gap older than this is taken to be a rollback (or a deleted row) and skipped.
GAP_WAIT_S = 5.0
#: Most rows one poll reads from one table; a backlog is read over several polls.
POLL_LIMIT = 500
#: Agent statuses (aios.agents.health) a ``state`` filter may name besides task states.
AGENT_STATUSES = frozenset({"ONLINE", "BUSY", "DEGRADED", "DRAINING", "DISABLED", "OFFLINE"})
SOURCES = frozenset({"task", "agent"})


@dataclass(frozen=True)
class FeedEvent:
    """One event as streamed: ``kind`` is ``state``, ``progress`` or ``note`` (task) or ``agent``."""

    kind: str
    source: str
    id: int
    at: datetime
    data: dict[str, Any]


def task_event_kind(to_state: str | None, detail: dict[str, Any] | None) -> str:
    if to_state is not None:
        return "state"
    return "progress" if detail and "progress" in detail else "note"


def task_event(
    event: TaskEvent, *, task_type: str | None = None, agent: str | None = None, with_task: bool = False
) -> FeedEvent:
    kind = task_event_kind(event.to_state, event.detail)
    data: dict[str, Any] = {
        "id": event.id,
        "task_id": event.task_id,
        "at": isoformat(event.at),
        "actor": event.actor,
        "from_state": event.from_state,
        "to_state": event.to_state,
        "detail": event.detail,
    }
    if kind == "progress" and event.detail:
        data["percent"] = event.detail.get("progress")
        data["message"] = event.detail.get("message")
    if with_task:
        data["type"], data["agent"] = task_type, agent
    return FeedEvent(kind=kind, source="task", id=event.id, at=event.at, data=data)


def agent_event(event: AgentEvent) -> FeedEvent:
    data = {
        "id": event.id,
        "agent": event.agent,
        "at": isoformat(event.at),
        "from_status": event.from_status,
        "to_status": event.to_status,
        "reason": event.reason,
    }
    return FeedEvent(kind="agent", source="agent", id=event.id, at=event.at, data=data)


def parse_event_id(text: str | None, *, field: str) -> int | None:
    """A task stream's resume point (a ``task_events`` id), or None when not given."""
    if text is None or text == "":
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ValidationFailed(
            f"{field}: an event id is a whole number, as sent in the stream's id: lines", field=field
        )
    return int(text)


class TaskFeed:
    """One task's timeline from ``after_id`` on; :attr:`ended` once the task is terminal and all was read."""

    def __init__(self, settings: Settings, task_id: str, after_id: int = 0, *, limit: int = POLL_LIMIT) -> None:
        self.settings, self.task_id, self.last_id, self.limit = settings, task_id, after_id, limit
        self.ended = False

    def poll(self) -> list[FeedEvent]:
        with session_scope(self.settings.database) as session:
            # The state first: in READ COMMITTED the events query then sees at least as much, so a
            # terminal state read here means its event (same transaction) is in this batch or an earlier one.
            state = session.scalar(select(Task.state).where(Task.id == self.task_id))
            rows = list(
                session.scalars(
                    select(TaskEvent)
                    .where(TaskEvent.task_id == self.task_id, TaskEvent.id > self.last_id)
                    .order_by(TaskEvent.id)
                    .limit(self.limit)
                )
            )
            events = [task_event(row) for row in rows]
        if events:
            self.last_id = events[-1].id
        if state is None or (TaskState(state) in TERMINAL and len(rows) < self.limit):
            self.ended = True
        return events


@dataclass(frozen=True)
class FeedFilter:
    """What :class:`ClusterFeed` passes. Empty sets pass everything.

    ``states`` keeps state changes into those states (task ``to_state``, agent ``to_status``; progress
    and notes have no state and are dropped); ``types`` keeps task events of those task types;
    ``agents`` keeps task events of tasks on those agents (``tasks.agent``: the current run's) and those
    agents' own events. ``types`` does not apply to agent events.
    """

    sources: frozenset[str] = SOURCES
    states: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    agents: frozenset[str] = frozenset()

    @classmethod
    def parse(
        cls, *, types: str | None = None, state: str | None = None, type: str | None = None, agent: str | None = None
    ) -> FeedFilter:
        """From the query string of ``GET /api/v1/events`` (comma-separated lists)."""
        sources = _split(types, "types") or SOURCES
        if unknown := sources - SOURCES:
            raise ValidationFailed(
                f"types: {', '.join(sorted(unknown))} unknown (give task, agent or both)", field="types"
            )
        states = _split(state, "state")
        known = {s.value for s in TaskState} | AGENT_STATUSES
        if unknown := states - known:
            raise ValidationFailed(
                f"state: {', '.join(sorted(unknown))} is not a task state or agent status", field="state"
            )
        return cls(
            sources=frozenset(sources),
            states=frozenset(states),
            types=frozenset(_split(type, "type")),
            agents=frozenset(_split(agent, "agent")),
        )


def _split(value: str | None, field: str) -> set[str]:
    if value is None:
        return set()
    items = {item.strip() for item in value.split(",") if item.strip()}
    if len(items) > 100 or any(len(item) > 255 or "\x00" in item for item in items):
        raise ValidationFailed(f"{field}: at most 100 names of up to 255 characters", field=field)
    return items


@dataclass(frozen=True)
class Cursor:
    """Where a cluster feed is: the last ``task_events`` id and ``agent_events`` id it has passed.

    Sent as the SSE ``id:`` of every event as ``<task_event_id>:<agent_event_id>``.
    """

    task_id: int
    agent_id: int

    def encode(self) -> str:
        return f"{self.task_id}:{self.agent_id}"

    @classmethod
    def parse(cls, text: str | None, *, field: str) -> Cursor | None:
        if text is None or text == "":
            return None
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts):
            raise ValidationFailed(
                f"{field}: a cluster event id is <task_event_id>:<agent_event_id>, as sent in the stream's id: lines",
                field=field,
            )
        return cls(int(parts[0]), int(parts[1]))


def latest_cursor(session: Session) -> Cursor:
    """The cursor of "now": a feed started here delivers only what happens from now on."""
    return Cursor(
        session.scalar(select(func.coalesce(func.max(TaskEvent.id), 0))) or 0,
        session.scalar(select(func.coalesce(func.max(AgentEvent.id), 0))) or 0,
    )


class Watermark:
    """The highest id of one table up to which every row has been seen (or given up on, see the module doc)."""

    def __init__(self, value: int, *, clock: Callable[[], float] = time.monotonic, wait_s: float = GAP_WAIT_S) -> None:
        self.value = value
        self._clock, self._wait_s = clock, wait_s
        #: The gap we are waiting on: (first missing id, last missing id, when first seen).
        self._gap: tuple[int, int, float] | None = None

    def advance(self, rows: Iterable[tuple[int, datetime]], now: datetime | None = None) -> int:
        """Move over ``rows`` ((id, at), ascending, all above the watermark) up to the first gap still worth
        waiting for; return the new watermark."""
        now = now or utcnow()
        mark = self.value
        for row_id, at in rows:
            if row_id != mark + 1 and not self._give_up(mark + 1, row_id - 1, at, now):
                break
            mark = row_id
        self.value = mark
        return mark

    def _give_up(self, first: int, last: int, at_after: datetime, now: datetime) -> bool:
        if (now - at_after).total_seconds() > self._wait_s:
            return True  # the row after the gap is old: the gap's writer is long done (rolled back)
        seen = self._clock()
        if self._gap is None or not self._gap[0] <= first <= self._gap[1]:
            self._gap = (first, last, seen)  # a new gap (or one partly filled keeps its first sighting)
        if seen - self._gap[2] > self._wait_s:
            self._gap = None
            return True
        return False


class ClusterFeed:
    """Every task and agent event (filtered) after ``cursor``, in time order, one poll at a time."""

    def __init__(
        self,
        settings: Settings,
        cursor: Cursor,
        where: FeedFilter,
        *,
        limit: int = POLL_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.where, self.limit = settings, where, limit
        self.tasks = Watermark(cursor.task_id, clock=clock)
        self.agents = Watermark(cursor.agent_id, clock=clock)

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.tasks.value, self.agents.value)

    def poll(self) -> list[tuple[FeedEvent, Cursor]]:
        """New events, each with the cursor to resume after it."""
        where = self.where
        task_events: list[FeedEvent] = []
        agent_events: list[FeedEvent] = []
        start = self.cursor
        with session_scope(self.settings.database) as session:
            if "task" in where.sources:
                task_events = self._task_events(session, start.task_id)
            if "agent" in where.sources:
                agent_events = self._agent_events(session, start.agent_id)
        # Merge the two tables by time, comparing heads only: each table keeps its id order (so every
        # cursor handed out is an exact resume point even if two writers' clocks disagree).
        out: list[tuple[FeedEvent, Cursor]] = []
        task_mark, agent_mark = start.task_id, start.agent_id
        for event in heapq.merge(task_events, agent_events, key=lambda e: e.at):
            if event.source == "task":
                task_mark = event.id
            else:
                agent_mark = event.id
            out.append((event, Cursor(task_mark, agent_mark)))
        return out

    def _task_events(self, session: Session, after: int) -> list[FeedEvent]:
        ids = session.execute(
            select(TaskEvent.id, TaskEvent.at).where(TaskEvent.id > after).order_by(TaskEvent.id).limit(self.limit)
        ).all()
        upto = self.tasks.advance((row.id, row.at) for row in ids)
        if upto == after:
            return []
        statement = (
            select(TaskEvent, Task.type, Task.agent)
            .join(Task, Task.id == TaskEvent.task_id)
            .where(TaskEvent.id > after, TaskEvent.id <= upto)
            .order_by(TaskEvent.id)
        )
        if self.where.states:
            statement = statement.where(TaskEvent.to_state.in_(self.where.states))
        if self.where.types:
            statement = statement.where(Task.type.in_(self.where.types))
        if self.where.agents:
            statement = statement.where(Task.agent.in_(self.where.agents))
        return [
            task_event(event, task_type=task_type, agent=agent, with_task=True)
            for event, task_type, agent in session.execute(statement)
        ]

    def _agent_events(self, session: Session, after: int) -> list[FeedEvent]:
        ids = session.execute(
            select(AgentEvent.id, AgentEvent.at).where(AgentEvent.id > after).order_by(AgentEvent.id).limit(self.limit)
        ).all()
        upto = self.agents.advance((row.id, row.at) for row in ids)
        if upto == after:
            return []
        statement = select(AgentEvent).where(AgentEvent.id > after, AgentEvent.id <= upto).order_by(AgentEvent.id)
        if self.where.states:
            statement = statement.where(AgentEvent.to_status.in_(self.where.states))
        if self.where.agents:
            statement = statement.where(AgentEvent.agent.in_(self.where.agents))
        return [agent_event(event) for event in session.scalars(statement)]
