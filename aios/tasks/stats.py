"""Task metrics that are right for the whole cluster: counts and histograms rolled up from the ledger.

A Prometheus counter kept in one process counts only what that process saw: an agent's finished
tasks would be scattered over every agent host, an API process's over its gunicorn siblings, and all
of it lost on restart (Flower's in-memory history has the same flaw). So AIOS derives task metrics
from ``task_events``, the durable timeline every process already writes, and keeps the running
totals in ``task_stats``:

* ``finished:<STATE>`` — tasks that reached a final state (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT,
  DEAD), by type;
* ``run`` — seconds from a run's start to its end (every ended attempt, retried ones included);
* ``wait`` — seconds from being queued to being started (queue wait).

:func:`rollup` reads the events after its cursor (``stat_cursors``), oldest first and at most
``limit`` per call, and adds them to the totals in the same transaction that moves the cursor; the
cursor moves by a conditional UPDATE, so two processes rolling up at once never count an event
twice. Events younger than ``settle_s`` are left for the next call: ids are handed out at INSERT,
not at COMMIT, so a slow transaction can commit an id below one already seen; waiting a few seconds
keeps those from being skipped. Any process may call it (each scrape of ``/metrics`` does); the
answer is the same whichever process is asked.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from aios.config import Settings
from aios.db import session_scope
from aios.models import StatCursor, Task, TaskEvent, TaskStat
from aios.tasks.states import TERMINAL, TaskState
from aios.timeutil import as_utc, utcnow

CURSOR = "task_events"
#: Upper bounds (seconds) of the run-time and queue-wait histogram buckets (+Inf is implied).
BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200)
FINISHED = "finished:"


@dataclass
class Series:
    count: int = 0
    sum: float = 0.0
    #: Per-bucket counts (not cumulative), one per bound in BUCKETS plus +Inf.
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1


def _collect(session: Session, after_id: int, before: object, limit: int) -> tuple[int, dict[tuple[str, str], Series]]:
    rows = session.execute(
        select(
            TaskEvent.id,
            TaskEvent.at,
            TaskEvent.from_state,
            TaskEvent.to_state,
            Task.type,
            Task.queued_at,
            Task.started_at,
        )
        .join(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.id > after_id, TaskEvent.at < before, TaskEvent.to_state.is_not(None))
        .order_by(TaskEvent.id)
        .limit(limit)
    ).all()
    totals: dict[tuple[str, str], Series] = defaultdict(Series)
    last_id = after_id
    for row in rows:
        last_id = row.id
        at = as_utc(row.at)
        if row.to_state in TERMINAL:
            totals[(row.type, FINISHED + row.to_state)].count += 1
        if row.to_state == TaskState.RUNNING.value and row.queued_at is not None:
            wait = (at - as_utc(row.queued_at)).total_seconds()  # type: ignore[operator]
            if wait >= 0:  # a later re-queue moved queued_at past this event: not measurable any more
                totals[(row.type, "wait")].observe(wait)
        if row.from_state == TaskState.RUNNING.value and row.started_at is not None:
            run = (at - as_utc(row.started_at)).total_seconds()  # type: ignore[operator]
            if run >= 0:
                totals[(row.type, "run")].observe(run)
    return last_id, totals


def rollup(settings: Settings, *, settle_s: float = 5.0, limit: int = 20_000) -> int:
    """Add settled events after the cursor to the totals; returns how many observations were added."""
    with session_scope(settings.database) as session:
        cursor = session.get(StatCursor, CURSOR)
        if cursor is None:
            session.add(StatCursor(name=CURSOR, last_id=0))
            session.flush()
            after = 0
        else:
            after = cursor.last_id
        last_id, totals = _collect(session, after, utcnow() - timedelta(seconds=settle_s), limit)
        if last_id == after:
            return 0
        # An UPDATE's result is a CursorResult (Session.execute is typed with the general Result).
        moved = cast(
            CursorResult[Any],
            session.execute(
                update(StatCursor).where(StatCursor.name == CURSOR, StatCursor.last_id == after).values(last_id=last_id)
            ),
        ).rowcount
        if moved != 1:
            session.rollback()  # another process rolled these up meanwhile
            return 0
        for (task_type, series), delta in totals.items():
            row = session.get(TaskStat, (task_type, series), with_for_update=True)
            if row is None:
                row = TaskStat(type=task_type, series=series, count=0, sum=0.0, buckets=[0] * (len(BUCKETS) + 1))
                session.add(row)
            row.count += delta.count
            row.sum += delta.sum
            if not series.startswith(FINISHED):
                row.buckets = [
                    a + b for a, b in zip(row.buckets or [0] * len(delta.buckets), delta.buckets, strict=True)
                ]
        return sum(delta.count for delta in totals.values())


def read_stats(settings: Settings) -> list[TaskStat]:
    with session_scope(settings.database) as session:
        rows = list(session.scalars(select(TaskStat).order_by(TaskStat.type, TaskStat.series)))
        session.expunge_all()
    return rows
