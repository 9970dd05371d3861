"""Runs past their timeout that nobody stopped: the sync job's ``timeouts`` step.

An agent enforces a run's limits itself: ``timeout_s`` (soft: the task is told and recorded TIMED_OUT)
and ``timeout_s + timeout_grace_s`` (hard: the pool process is killed, :class:`workers.tasks.AiosRequest`
records TIMED_OUT). A task still RUNNING ``timeout_s + 2 * timeout_grace_s`` after it started is past
both, so its agent is gone or stuck: sync records it TIMED_OUT (fenced on the dispatch id it read) and
revokes it (terminate), in case the agent is merely slow to hear.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from aios.config import Settings
from aios.db import session_scope
from aios.models import Task
from aios.recovery.context import ACTOR, MAX_ROWS_PER_STEP, SyncContext
from aios.tasks.actions import revoke
from aios.tasks.states import TaskState, transition
from aios.timeutil import utcnow


def overdue_after_s(settings: Settings, timeout_s: int) -> float:
    """How long after its start a RUNNING task is certainly past every limit its agent enforces."""
    return timeout_s + 2 * settings.orchestrator.timeout_grace_s


def stop_overdue(run: SyncContext) -> None:
    """TIMED_OUT for every RUNNING task past :func:`overdue_after_s`, then revoke it on its agent."""
    now = utcnow()
    # Nothing can be overdue that started less than the shortest possible limit ago (timeout_s >= 1).
    latest_start = now - timedelta(seconds=overdue_after_s(run.settings, 1))
    with session_scope(run.settings.database) as session:
        rows = session.execute(
            select(Task.id, Task.dispatch_id, Task.started_at, Task.timeout_s, Task.agent)
            # created_at <= started_at: the bound lets the (state, created_at) index read only old rows.
            .where(
                Task.state == TaskState.RUNNING.value, Task.created_at < latest_start, Task.started_at < latest_start
            )
            .order_by(Task.created_at, Task.id)
            .limit(MAX_ROWS_PER_STEP)
        ).all()
        overdue = [
            r for r in rows if r.started_at + timedelta(seconds=overdue_after_s(run.settings, r.timeout_s)) < now
        ]
        run.found["overdue"] = len(overdue)
        stopped = []
        for row in overdue:
            ran_s = (now - row.started_at).total_seconds()
            if transition(
                session,
                row.id,
                TaskState.RUNNING,
                TaskState.TIMED_OUT,
                actor=ACTOR,
                fence=row.dispatch_id,
                detail={
                    "reason": "past its timeout",
                    "ran_s": round(ran_s, 1),
                    "agent": row.agent,
                    "dispatch_id": row.dispatch_id,
                },
                values={
                    "error": f"timed out: still RUNNING {ran_s:.0f}s after it started on "
                    f"{row.agent} (timeout_s {row.timeout_s}); stopped by the sync job"
                },
            ):
                stopped.append(row.id)
    run.changed["timed_out"] = len(stopped)
    if stopped and run.need_broker("timeouts: revoke"):
        for task_id in stopped:
            revoke(run.celery, task_id, terminate=True)
