"""The sync job: make the broker and the agents agree with the ledger again, every ``sync_interval_s``.

Things go wrong between the database and the broker: a publish fails (broker outage), a process dies
between committing ``QUEUED`` and publishing, a message is lost, an agent dies with work in hand, a run
hangs past its timeout. Each of those leaves a row that nothing else will move. :func:`run_sync` finds
them and moves them, in steps that are each idempotent and bounded (at most
:data:`~aios.recovery.context.MAX_ROWS_PER_STEP` rows per step per run). A failing step records its
error and the other steps still run; every run writes one ``sync_runs`` row (what it found, what it
changed, what failed).

Steps, in order (each in the module named for what it repairs):

1. ``keys``: ACTIVE API keys past ``expires_at`` (a rotated key past its grace period too) become
   EXPIRED, with an audit row each (:func:`aios.security.api_keys.expire_and_audit`; not a repair,
   but a periodic chore that needs the same leader).
2. ``agents``: agents past the heartbeat timeout go OFFLINE and their work is re-routed
   (:func:`aios.recovery.reroute.sweep_offline`; a live agent's heartbeat usually did it sooner).
3. ``timeouts``: RUNNING tasks still running ``timeout_s + 2 * timeout_grace_s`` after they started
   become TIMED_OUT and are revoked (:mod:`aios.recovery.timeouts`).
4. ``lost_runs`` and ``orphaned_runs``: RUNNING tasks whose agent is OFFLINE, deleted or unknown, or
   whose live agent no longer runs them, are failed, DEAD or retried by the rule of a lost run
   (:mod:`aios.recovery.lost_runs`).
5. ``pending``, 6. ``lost_messages``, 7. ``duplicates``: work the broker lost track of
   (:mod:`aios.recovery.messages`).

Conflict rules (the same everywhere in AIOS; ``docs/sync.md`` says them for operators):

* The database is the source of truth. The broker and the agents are made to agree with it, never the
  other way round: sync never infers a task's outcome from the broker.
* A terminal state is never overwritten: every change is one conditional UPDATE from the state sync
  read (:mod:`aios.tasks.states`), and a terminal state has no way out.
* Every change sync makes to a RUNNING or QUEUED task is fenced on the dispatch id it read, and every
  re-dispatch gets a new dispatch id. An agent acts only on the dispatch it was given
  (:mod:`workers.runner`): a late delivery of the old message is skipped with a note event, and a late
  report from a fenced-off run is recorded as a note event and otherwise ignored.
* Losing a race is not an error: a row that moved on between sync's read and its write is left as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery import Celery
from sqlalchemy import select

from aios.config import Settings
from aios.db import session_scope
from aios.models import SyncRun
from aios.recovery import lost_runs, messages, reroute, timeouts
from aios.recovery.context import ACTOR, MAX_ROWS_PER_STEP, SyncContext
from aios.security import api_keys
from aios.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

#: Longest the broker may take to answer before the steps that need it are skipped.
BROKER_CHECK_TIMEOUT_S = 2.0


def run_sync(celery: Celery, settings: Settings, *, runner: str) -> dict[str, Any]:
    """Run every step once and record the run; returns the ``sync_runs`` row as a dict.

    Never raises for a step's failure (it is in ``errors``); raises only if the run cannot be
    recorded at all (no database).
    """
    started_at, began = utcnow(), time.monotonic()
    run = SyncContext(celery=celery, settings=settings)
    run.broker_down = _broker_problem(celery)
    if run.broker_down:
        run.errors.append(f"broker: unreachable ({run.broker_down}); steps that need it were skipped")
    for name, step in STEPS:
        try:
            step(run)
        except Exception as exc:  # noqa: BLE001 - one step's failure must not stop the others
            logger.exception("sync step %s failed", name)
            run.errors.append(f"{name}: {type(exc).__name__}: {exc}"[:1000])
    found = {**run.found, "notes": run.notes}
    row = SyncRun(
        started_at=started_at,
        duration_s=round(time.monotonic() - began, 6),
        runner=runner[:255],
        found=found,
        changed=run.changed,
        errors=run.errors,
    )
    with session_scope(settings.database) as session:
        session.add(row)
        session.flush()
        result = sync_run_to_dict(row)
    level = logging.WARNING if run.errors else logging.INFO
    fixed = {key: value for key, value in run.changed.items() if value}
    logger.log(
        level,
        "sync run %s by %s took %.3fs: changed %s%s",
        result["id"],
        runner,
        result["duration_s"],
        fixed or "nothing",
        f"; errors: {run.errors}" if run.errors else "",
    )
    return result


def sync_run_to_dict(row: SyncRun) -> dict[str, Any]:
    return {
        "id": row.id,
        "started_at": isoformat(row.started_at),
        "duration_s": row.duration_s,
        "runner": row.runner,
        "found": row.found,
        "changed": row.changed,
        "errors": row.errors,
    }


def list_runs(settings: Settings, *, limit: int, before: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
    """Newest first; pass the returned id back as ``before`` for the next page (None: no more)."""
    with session_scope(settings.database) as session:
        statement = select(SyncRun).order_by(SyncRun.id.desc()).limit(limit + 1)
        if before is not None:
            statement = statement.where(SyncRun.id < before)
        rows = list(session.scalars(statement))
        page = [sync_run_to_dict(row) for row in rows[:limit]]
    return page, (page[-1]["id"] if len(rows) > limit else None)


def _broker_problem(celery: Celery) -> str | None:
    try:
        with celery.connection_for_write() as connection:
            connection.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2, timeout=BROKER_CHECK_TIMEOUT_S
            )
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable now"
        return f"{type(exc).__name__}: {exc}"[:300]


# --------------------------------------------------------------------------- the two steps kept here


def _expire_keys(run: SyncContext) -> None:
    with session_scope(run.settings.database) as session:
        expired = api_keys.expire_and_audit(session, utcnow(), actor=ACTOR, limit=MAX_ROWS_PER_STEP)
    run.found["keys_expired"] = run.changed["keys_expired"] = expired


def _agents(run: SyncContext) -> None:
    lost = reroute.sweep_offline(run.settings, run.celery)
    run.found["agents_stale"] = run.changed["agents_offline"] = len(lost)


STEPS: tuple[tuple[str, Callable[[SyncContext], None]], ...] = (
    ("keys", _expire_keys),
    ("agents", _agents),
    ("timeouts", timeouts.stop_overdue),
    ("lost_runs", lost_runs.settle_lost_runs),
    ("orphaned_runs", lost_runs.settle_orphaned_runs),
    ("pending", messages.dispatch_pending),
    ("lost_messages", messages.redispatch_lost_messages),
    ("duplicates", messages.note_duplicates),
)
