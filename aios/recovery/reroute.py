"""Moving an agent's tasks elsewhere once it is out: dead, silent, stopped, drained or disabled.

The agent's status changes in :mod:`aios.agents.registry`; this module moves its work, and only the
process whose status change won does it, so the work moves once however many notice at the same moment:

* **silent** (no heartbeat for ``agents.heartbeat_timeout_s``, by default three
  ``heartbeat_interval_s``): :func:`sweep_offline`, run by every live agent after each heartbeat
  (:mod:`workers.heartbeat`) and by the sync job's ``agents`` step. Its QUEUED tasks are routed again
  and its RUNNING ones settled as lost runs (:func:`aios.recovery.lost_runs.settle_lost_run`).
* **stopped cleanly** (a warm shutdown): :func:`agent_stopped`, from the heartbeat bootstep's stop. Its
  QUEUED tasks are routed again; its RUNNING ones are left to finish (a warm shutdown waits for them),
  and one still RUNNING once the agent is gone is settled by the sync job's ``lost_runs`` step.
* **drained or disabled** by an operator: :func:`admin_status_changed`, from the API and the dashboard.
  Its QUEUED tasks are routed again; what it runs now finishes there.

Routing again means QUEUED → PENDING (``pending_reason`` ``rerouted``) and a new dispatch under a new
dispatch id: a stale copy of the old message still in the agent's queue is skipped when it arrives.
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select

from aios.agents import registry
from aios.config import Settings
from aios.db import session_scope
from aios.models import Task
from aios.recovery.lost_runs import settle_lost_run
from aios.tasks.create import dispatch
from aios.tasks.states import TaskState, transition_many

#: The actor of the task events a re-route writes.
ACTOR = "router"


def sweep_offline(settings: Settings, celery: Celery) -> list[str]:
    """Mark agents past the heartbeat timeout OFFLINE and re-route their work (bounded, idempotent);
    returns the agents this process marked."""
    lost = []
    for name in registry.mark_silent_offline(settings):
        lost.append(name)
        reroute(settings, celery, name, include_running=True, reason="agent offline")
    return lost


def agent_stopped(settings: Settings, celery: Celery, name: str, reason: str) -> bool:
    """Mark an agent OFFLINE now (a clean shutdown) and re-route its queued work if this call did it."""
    won = registry.mark_offline(settings, name, reason)
    if won:
        reroute(settings, celery, name, include_running=False, reason=reason)
        registry.forget_healthy_cache()
    return won


def admin_status_changed(settings: Settings, celery: Celery, name: str, status: str | None) -> None:
    """After an operator set ``status``: a drained or disabled agent takes no new work, so what waits in
    its own queue goes to other agents (stale copies are fenced off); what it runs now finishes."""
    if status in ("DRAINING", "DISABLED"):
        reroute(settings, celery, name, include_running=False, reason=f"agent {status.lower()}")


def reroute(settings: Settings, celery: Celery, name: str, *, include_running: bool, reason: str) -> dict[str, int]:
    """Move an agent's QUEUED tasks to other agents (new dispatch ids); with ``include_running``, settle
    its RUNNING ones as lost runs (retried at once, failed or DEAD)."""
    # This process may have cached the healthy set while the agent was still in it (up to a second
    # ago): routing from that copy would send its work straight back to its own queue.
    registry.forget_healthy_cache()
    with session_scope(settings.database) as session:
        queued = list(
            session.scalars(
                select(Task.id).where(Task.state == TaskState.QUEUED.value, Task.queue == registry.agent_queue(name))
            )
        )
        moved = transition_many(
            session,
            queued,
            TaskState.QUEUED,
            TaskState.PENDING,
            actor=ACTOR,
            detail={"reason": reason, "agent": name},
            values={"pending_reason": "rerouted"},
        )
        retry_ids: list[str] = []
        if include_running:
            running = session.execute(
                select(Task.id, Task.on_agent_lost, Task.attempts, Task.max_retries).where(
                    Task.state == TaskState.RUNNING.value, Task.agent == name
                )
            ).all()
            for row in running:
                outcome = settle_lost_run(session, settings, row, agent=name, reason=reason, actor=ACTOR)
                if outcome is TaskState.RETRYING:
                    retry_ids.append(row.id)
    if moved:
        dispatch(celery, settings, moved, actor=ACTOR)
    if retry_ids:
        dispatch(celery, settings, retry_ids, actor=ACTOR, from_state=TaskState.RETRYING)
    return {"queued": len(moved), "retried": len(retry_ids)}
