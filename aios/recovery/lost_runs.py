"""Runs that ended with no outcome recorded, and the one rule that settles them.

A RUNNING task whose run is gone (its agent died, went silent, lost its broker connection, or no
longer holds it) is settled by :func:`settle_lost_run`: FAILED if it asked ``on_agent_lost=fail``,
DEAD when no retries are left, else RETRYING and dispatched again at once
(:func:`aios.tasks.retries.after_failure` decides). Who finds such runs:

* :func:`aios.recovery.reroute.reroute`, for the RUNNING tasks of an agent just marked OFFLINE;
* the sync job's ``lost_runs`` step (:func:`settle_lost_runs`): RUNNING tasks whose agent is OFFLINE,
  deleted or unknown, that no re-route settled (the process that marked it OFFLINE died, or the agent
  row was deleted); an agent that still answers ``inspect active`` with the task is left alone;
* the sync job's ``orphaned_runs`` step (:func:`settle_orphaned_runs`): RUNNING tasks of a live agent
  that answers ``inspect active`` without them, started more than ``lost_message_grace_s`` ago;
* the agent itself, when Celery cancels its runs on a broker connection loss
  (:func:`record_cancelled_run`, from :class:`workers.tasks.AiosRequest`).

A run whose pool process died is not lost in this sense: its agent saw it end and records a failed
attempt itself (:func:`workers.runner.record_lost_run`, by the same decision function).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from aios.agents.health import AgentStatus
from aios.config import Settings
from aios.db import session_scope
from aios.models import Agent, Task
from aios.recovery.context import ACTOR, INSPECT_TIMEOUT_S, MAX_ROWS_PER_STEP, SyncContext
from aios.tasks.create import dispatch
from aios.tasks.retries import after_failure
from aios.tasks.states import TaskState, transition, transition_many
from aios.timeutil import utcnow

logger = logging.getLogger(__name__)

#: ``pending_reason`` of a run Celery cancelled when the agent lost its broker connection.
CANCELLED_ON_CONNECTION_LOSS = "connection_lost"


def settle_lost_run(
    session: Session,
    settings: Settings,
    row: Any,
    *,
    agent: str | None,
    reason: str,
    actor: str,
    fence: str | None = None,
    what: str | None = None,
) -> TaskState | None:
    """The one rule for a RUNNING task whose run is gone: FAILED, DEAD or RETRYING, as
    :func:`aios.tasks.retries.after_failure` decides for a lost run (the caller dispatches a RETRYING
    task again, at once).

    ``row`` has ``id, on_agent_lost, attempts, max_retries``; ``fence`` (a dispatch id) makes the change
    only if the run is still the one that was read; ``what`` says what happened to the run (default:
    its agent was lost). Returns the state moved to, or None if it moved on.
    """
    detail = {"reason": f"{reason}: {what or f'its agent {agent} was lost'}", "attempt": row.attempts}
    decision = after_failure(
        settings,
        attempts=row.attempts,
        max_retries=row.max_retries,
        error=what or f"agent {agent} was lost",
        run_lost=True,
        on_agent_lost=row.on_agent_lost,
    )
    moved = transition_many(
        session,
        [row.id],
        TaskState.RUNNING,
        decision.state,
        actor=actor,
        detail=detail,
        fence=fence,
        values={"error": decision.error},
    )
    return decision.state if moved else None


def running_run(session: Session, task_id: str, dispatch_id: str) -> Any:
    """The task's row if it is still RUNNING under ``dispatch_id`` (else None: it moved on)."""
    row = session.execute(
        select(
            Task.id,
            Task.state,
            Task.dispatch_id,
            Task.type,
            Task.parameters,
            Task.on_agent_lost,
            Task.attempts,
            Task.max_retries,
        ).where(Task.id == task_id)
    ).first()
    return row if row is not None and row.state == TaskState.RUNNING and row.dispatch_id == dispatch_id else None


def record_cancelled_run(settings: Settings, task_id: str, dispatch_id: str, agent: str) -> TaskState | None:
    """Celery stopped this run because the agent lost its broker connection
    (``worker_cancel_long_running_tasks_on_connection_loss``) and left its message unacked.

    Celery counts on the broker to deliver that message again, but a Redis without persistence lost it,
    and a Redis with persistence holds it back for the whole visibility timeout. So the ledger settles
    the run now, by the rule of a lost agent (:func:`settle_lost_run`): a task left to retry waits
    PENDING (``pending_reason`` ``connection_lost``) for the sync job to dispatch it under a new
    dispatch id once the broker answers, and a late delivery of the old message is fenced off. Runs in
    the worker's main process, which must not block on a broker that is down: nothing is published here.
    """
    with session_scope(settings.database) as session:
        row = running_run(session, task_id, dispatch_id)
        if row is None:
            return None
        actor = f"worker:{agent}"
        outcome = settle_lost_run(
            session,
            settings,
            row,
            agent=agent,
            reason="cancelled by Celery",
            actor=actor,
            fence=dispatch_id,
            what=f"agent {agent} lost its broker connection",
        )
        if outcome is TaskState.RETRYING:
            transition(
                session,
                task_id,
                TaskState.RETRYING,
                TaskState.PENDING,
                actor=actor,
                detail={"reason": "waits for the sync job to dispatch it again"},
                values={"pending_reason": CANCELLED_ON_CONNECTION_LOSS},
            )
            outcome = TaskState.PENDING
    logger.warning("run %s of task %s was cancelled on broker connection loss: now %s", dispatch_id, task_id, outcome)
    return outcome


# --------------------------------------------------------------------------- the sync job's steps


def settle_lost_runs(run: SyncContext) -> None:
    """``lost_runs``: RUNNING tasks whose agent is OFFLINE, deleted or unknown, unless it still runs them."""
    with session_scope(run.settings.database) as session:
        rows = session.execute(
            select(
                Task.id, Task.dispatch_id, Task.agent, Task.on_agent_lost, Task.attempts, Task.max_retries, Agent.status
            )
            .outerjoin(Agent, Agent.name == Task.agent)
            .where(
                Task.state == TaskState.RUNNING.value,
                or_(Agent.name.is_(None), Agent.status == AgentStatus.OFFLINE.value),
            )
            .order_by(Task.started_at)
            .limit(MAX_ROWS_PER_STEP)
        ).all()
    if not rows:
        return
    alive = _still_running(run, rows)
    lost = [row for row in rows if row.id not in alive]
    run.found["lost_runs"] = len(lost)
    _settle(run, lost, lambda row: ("sync: agent offline" if row.status else "sync: agent unknown", None))


def settle_orphaned_runs(run: SyncContext) -> None:
    """``orphaned_runs``: RUNNING tasks of a live agent that answers ``inspect active`` without them."""
    cutoff = utcnow() - timedelta(seconds=run.settings.orchestrator.lost_message_grace_s)
    with session_scope(run.settings.database) as session:
        rows = session.execute(
            select(Task.id, Task.dispatch_id, Task.agent, Task.on_agent_lost, Task.attempts, Task.max_retries)
            .join(Agent, Agent.name == Task.agent)
            .where(
                Task.state == TaskState.RUNNING.value,
                Task.started_at < cutoff,
                Agent.status != AgentStatus.OFFLINE.value,
            )
            .order_by(Task.started_at)
            .limit(MAX_ROWS_PER_STEP)
        ).all()
    if not rows or not run.need_broker("orphaned_runs"):
        return
    replies = run.active_replies("orphaned_runs")
    if replies is None:
        return
    # Only an agent that answered can say it does not run a task; the fence (the dispatch id read above,
    # and the RUNNING state) leaves alone a run that finished or moved on since it was read.
    held = {(agent, request.get("id")) for agent, requests in replies.items() for request in requests}
    orphans = [row for row in rows if row.agent in replies and (row.agent, row.id) not in held]
    run.found["orphaned_runs"] = len(orphans)
    _settle(
        run,
        orphans,
        lambda row: ("sync: orphaned run", f"agent {row.agent} no longer runs it (not in its inspect active reply)"),
    )


def _settle(run: SyncContext, rows: list[Any], why: Callable[[Any], tuple[str, str | None]]) -> None:
    """Settle each RUNNING row by :func:`settle_lost_run` (fenced on the dispatch id read), count the
    outcomes, and dispatch again those left to retry. ``why(row)`` gives the event reason and what happened."""
    retry: list[str] = []
    with session_scope(run.settings.database) as session:
        for row in rows:
            reason, what = why(row)
            outcome = settle_lost_run(
                session,
                run.settings,
                row,
                agent=row.agent,
                reason=reason,
                actor=ACTOR,
                fence=row.dispatch_id,
                what=what,
            )
            if outcome is TaskState.RETRYING:
                retry.append(row.id)
            elif outcome is TaskState.FAILED:
                run.changed["failed"] += 1
            elif outcome is TaskState.DEAD:
                run.changed["dead"] += 1
    run.changed["retried"] += len(retry)
    if retry:
        dispatch(run.celery, run.settings, retry, actor=ACTOR, from_state=TaskState.RETRYING)


def _still_running(run: SyncContext, rows: Iterable[Any]) -> set[str]:
    """Ids of ``rows`` an agent says (``inspect active``) it is running: alive, whatever the ledger says."""
    agents = sorted({row.agent for row in rows if row.agent})
    if not agents or run.broker_down:
        return set()
    try:
        replies = (
            run.celery.control.inspect(destination=agents, timeout=INSPECT_TIMEOUT_S, limit=len(agents)).active() or {}
        )
    except Exception as exc:  # noqa: BLE001 - without an answer the ledger decides
        run.notes.append(f"lost_runs: inspect failed ({type(exc).__name__}: {exc}); went by the ledger")
        return set()
    wanted = {(row.agent, row.id) for row in rows}
    alive = {
        request.get("id")
        for agent, requests in replies.items()
        for request in (requests or [])
        if (agent, request.get("id")) in wanted
    }
    if alive:
        run.notes.append(f"lost_runs: {len(alive)} task(s) on an OFFLINE agent that still runs them were left alone")
    return alive
