"""Claim → run → record: what an agent does with one delivery, as plain functions.

The Celery task in :mod:`workers.tasks` only decodes the message and calls :func:`execute`; the
logic lives here so unit and integration tests can reach it without Celery's eager mode.

The claim is the fence: one conditional UPDATE (:func:`aios.tasks.states.claim`) moves the task to
RUNNING only if it is still QUEUED *for this dispatch*. A duplicate or stale delivery changes nothing
and is acked and skipped; a cancelled task is skipped the same way, even if the agent restarted since
the cancel. Every later write is fenced on the same dispatch id, so a report from a run that was
fenced off (cancelled, timed out, re-routed) is recorded as a note and otherwise ignored.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from aios.config import Settings
from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import Task
from aios.recovery.lost_runs import running_run
from aios.tasks import states
from aios.tasks.create import dispatch
from aios.tasks.retries import after_failure
from aios.tasks.states import TaskState, record_events
from aios.tasktypes import TaskContext, TaskFailure, TaskTimedOut, get_registry

logger = logging.getLogger(__name__)

#: Longest error text kept on a task row.
MAX_ERROR_CHARS = 4000
#: How long a run keeps retrying a claim or an outcome the database could not take (PostgreSQL
#: restarting, a failover): past it the error propagates and the sync job repairs the row later.
DB_RETRY_WINDOW_S = 120.0

_T = TypeVar("_T")


def with_db_retry(write: Callable[[], _T], what: str) -> _T:
    """Run ``write`` (one whole transaction), again with backoff while the database is unreachable.

    Why: a task whose work is done but whose SUCCEEDED could not be written would sit RUNNING until
    the sync job times it out — its effect recorded, its outcome lost. Every write here is a fenced
    conditional UPDATE, so running one again after a failed attempt is harmless."""
    deadline = time.monotonic() + DB_RETRY_WINDOW_S
    delay = 0.5
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning(
                "database unavailable while %s (%s); retrying in %.1fs", what, str(exc).splitlines()[0][:200], delay
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@dataclass(frozen=True)
class Claim:
    task_id: str
    dispatch_id: str
    agent: str
    type: str
    parameters: dict[str, Any]
    attempt: int
    max_retries: int

    @property
    def actor(self) -> str:
        return f"worker:{self.agent}"


def claim(settings: Settings, task_id: str, dispatch_id: str, agent: str) -> Claim | None:
    """Move the task to RUNNING for this dispatch, or return None (and note why) if it is not ours."""
    return with_db_retry(lambda: _claim(settings, task_id, dispatch_id, agent), f"claiming task {task_id}")


def _claim(settings: Settings, task_id: str, dispatch_id: str, agent: str) -> Claim | None:
    actor = f"worker:{agent}"
    row = states.claim(settings, task_id, dispatch_id, agent, actor=actor, detail={"dispatch_id": dispatch_id})
    if row is None:
        with session_scope(settings.database) as session:
            _not_claimed(session, task_id, dispatch_id, actor)
            return None
    return Claim(
        task_id=task_id,
        dispatch_id=dispatch_id,
        agent=agent,
        type=row.type,
        parameters=row.parameters,
        attempt=row.attempts,
        max_retries=row.max_retries,
    )


def _not_claimed(session: Any, task_id: str, dispatch_id: str, actor: str) -> None:
    """The claim moved nothing: say why (a note on the timeline), or drop a delivery for an unknown task."""
    row = session.execute(select(Task.state, Task.dispatch_id).where(Task.id == task_id)).first()
    if row is None:
        logger.warning("delivery for unknown task %s dropped", task_id)
        return None
    reason = (
        "cancelled"
        if row.state == TaskState.CANCELLED
        else ("duplicate delivery" if row.dispatch_id == dispatch_id else "stale dispatch")
    )
    logger.info("skipping task %s: %s (state %s)", task_id, reason, row.state)
    record_events(
        session,
        [task_id],
        actor=actor,
        from_state=None,
        to_state=None,
        detail={"note": f"delivery skipped: {reason}", "dispatch_id": dispatch_id, "state": row.state},
    )
    return None


def finish(settings: Settings, work: Claim, target: TaskState, **values: Any) -> bool:
    """Record the end of a run, fenced on its dispatch; a fenced-off report becomes a note."""
    return with_db_retry(
        lambda: _finish(settings, work, target, **values), f"recording task {work.task_id} {target.value}"
    )


def _finish(settings: Settings, work: Claim, target: TaskState, **values: Any) -> bool:
    detail: dict[str, Any] = {"attempt": work.attempt}
    if values.get("error"):
        detail["error"] = values["error"][:500]
    if states.record_outcome(settings, work.task_id, work.dispatch_id, target, values, actor=work.actor, detail=detail):
        return True
    with session_scope(settings.database) as session:
        return _not_finished(session, work, target)


def _not_finished(session: Any, work: Claim, target: TaskState) -> bool:
    """The outcome moved nothing: True if our own earlier attempt had recorded it, else a note and False."""
    row = session.execute(select(Task.state, Task.dispatch_id).where(Task.id == work.task_id)).first()
    if row is not None and row.state == target and row.dispatch_id == work.dispatch_id:
        return True  # our own earlier attempt committed, but its confirmation was lost (a retry)
    record_events(
        session,
        [work.task_id],
        actor=work.actor,
        from_state=None,
        to_state=None,
        detail={
            "note": f"late report ignored: run ended {target} after the task moved on",
            "dispatch_id": work.dispatch_id,
        },
    )
    return False


def fail_or_retry(celery: Celery, settings: Settings, work: Claim, error: str) -> TaskState:
    """A run failed: record what :func:`aios.tasks.retries.after_failure` decides (retried after its
    backoff while retries are left, else DEAD)."""
    decision = after_failure(
        settings, attempts=work.attempt, max_retries=work.max_retries, error=error[-MAX_ERROR_CHARS:]
    )
    recorded = finish(settings, work, decision.state, error=decision.error)
    if recorded and decision.retry_in_s is not None:  # RETRYING: publish it again, to run after its backoff
        dispatch(
            celery,
            settings,
            [work.task_id],
            actor=work.actor,
            from_state=TaskState.RETRYING,
            countdown_s={work.task_id: decision.retry_in_s},
        )
    return decision.state


def execute(celery: Celery, settings: Settings, task_id: str, dispatch_id: str, agent: str) -> TaskState | None:
    """Handle one delivery: claim it, run its task type, record the outcome. Never raises for task errors."""
    work = claim(settings, task_id, dispatch_id, agent)
    if work is None:
        return None
    ctx = TaskContext(task_id=task_id, attempt=work.attempt, agent=agent, settings=settings, dispatch_id=dispatch_id)
    try:
        task_type = get_registry().get(work.type)
        params = task_type.validate(work.parameters)
        result = task_type.run(params, ctx)
        result = json.loads(json.dumps(result))  # must be JSON; fail here, not in the database driver
    except SoftTimeLimitExceeded:
        _flush_progress(ctx)
        finish(settings, work, TaskState.TIMED_OUT, error="timed out: the task ran past its timeout_s")
        return TaskState.TIMED_OUT
    except TaskTimedOut as exc:  # the task type enforced its own time limit (a command's wall time)
        _flush_progress(ctx)
        finish(settings, work, TaskState.TIMED_OUT, error=str(exc)[:MAX_ERROR_CHARS], result=exc.result)
        return TaskState.TIMED_OUT
    except TaskFailure as exc:  # its message starts with a reason code; a result (an exit code) is kept
        _flush_progress(ctx)
        finish(settings, work, TaskState.FAILED, error=str(exc)[:MAX_ERROR_CHARS], result=exc.result)
        return TaskState.FAILED
    except ValidationFailed as exc:
        _flush_progress(ctx)
        finish(settings, work, TaskState.FAILED, error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        return TaskState.FAILED
    except Exception as exc:  # noqa: BLE001 - any other error is a failed attempt
        logger.exception("task %s (%s) failed on attempt %d", task_id, work.type, work.attempt)
        _flush_progress(ctx)
        return fail_or_retry(celery, settings, work, f"{type(exc).__name__}: {exc}")
    _flush_progress(ctx)
    finish(settings, work, TaskState.SUCCEEDED, result=result, error=None)
    return TaskState.SUCCEEDED


def _flush_progress(ctx: TaskContext) -> None:
    """Write a progress report the rate limit held back, before the final state: the timeline then
    reads in the order things happened. A failure here never changes the run's outcome."""
    try:
        ctx.flush_progress()
    except Exception:  # noqa: BLE001
        logger.warning("could not write the last progress of task %s", ctx.task_id, exc_info=True)


def record_lost_run(
    celery: Celery,
    settings: Settings,
    task_id: str,
    dispatch_id: str,
    agent: str,
    reason: str,
    target: TaskState | None = None,
) -> None:
    """The pool process running a task died or was killed (hard time limit, OOM, SIGKILL).

    Runs in the worker's main process. ``target`` TIMED_OUT records a hard timeout; otherwise the
    run counts as a failed attempt (retried while retries are left, so a task that kills its own
    process is bounded by max_retries instead of looping forever). Unlike a run lost with its agent
    (:mod:`aios.recovery.lost_runs`), the agent saw this one end, so it records the outcome itself,
    through the same fenced write as any other outcome.
    """
    with session_scope(settings.database) as session:
        row = running_run(session, task_id, dispatch_id)
    if row is None:
        return
    work = Claim(
        task_id=task_id,
        dispatch_id=dispatch_id,
        agent=agent,
        type=row.type,
        parameters=row.parameters,
        attempt=row.attempts,
        max_retries=row.max_retries,
    )
    if target is TaskState.TIMED_OUT:
        finish(settings, work, TaskState.TIMED_OUT, error=reason)
    else:
        fail_or_retry(celery, settings, work, reason)
