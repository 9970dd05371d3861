"""The sync job: make the broker and the agents agree with the ledger again, every ``sync_interval_s``.

Things go wrong between the database and the broker: a publish fails (broker outage), a process dies
between committing ``QUEUED`` and publishing, a message is lost, an agent dies with work in hand, a run
hangs past its timeout. Each of those leaves a row that nothing else will move. :func:`run_sync` finds
them and moves them, in steps that are each idempotent and bounded (at most :data:`MAX_ROWS_PER_STEP`
rows per step per run). A failing step records its error and the other steps still run; every run
writes one ``sync_runs`` row (what it found, what it changed, what failed).

Steps, in order:

1. ``keys``: ACTIVE API keys past ``expires_at`` (a rotated key past its grace period too) become
   EXPIRED, with an audit row each.
2. ``agents``: agents past the heartbeat timeout go OFFLINE and their work is re-routed
   (:func:`aios.agents.registry.sweep_offline`; a live agent's heartbeat usually did it sooner).
3. ``timeouts``: RUNNING tasks still running ``timeout_s + 2 * timeout_grace_s`` after they started
   (the agent's own hard limit fires at ``timeout_s + timeout_grace_s``, so the agent is gone or stuck)
   become TIMED_OUT and are revoked (terminate).
4. ``lost_runs``: RUNNING tasks whose agent is OFFLINE, deleted or unknown: failed, DEAD or retried by
   the same rule as a re-route (:func:`aios.agents.registry.settle_lost_run`). An agent that still answers
   ``inspect active`` with the task is alive (a warm shutdown finishing its work) and is left alone.
   ``orphaned_runs``: RUNNING tasks, started more than ``lost_message_grace_s`` ago, of a live agent that
   answers ``inspect active`` without them (the run ended and nobody recorded how, e.g. Celery cancelled
   it on a broker connection loss and the agent could not write it down) are settled by the same rule.
   An agent that does not answer is left to the heartbeat timeout.
5. ``pending``: PENDING tasks the API could not publish, that waited for a healthy agent, or that
   nobody dispatched for ``lost_message_grace_s`` (a process died after its commit) are dispatched;
   so are RETRYING tasks left that long (a process died between deciding a retry and publishing it).
6. ``lost_messages``: QUEUED tasks older than ``lost_message_grace_s`` whose message is in no broker
   queue and in no agent's hands, and QUEUED tasks stranded in the queue of an OFFLINE or unknown
   agent, go back to PENDING and are dispatched again under a new dispatch id.
7. ``duplicates``: a task that ``inspect active`` shows on two agents at once gets one note event.

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

The ``lost_messages`` check needs Redis and is skipped (with a note in ``found``) on other transports:
the embedded SQLite broker delivers a message a killed agent held again by itself (visibility
timeout), and messages of kombu's filesystem transport leave its queue folder when an agent fetches
them, so held and lost look the same there. Stranded tasks are still handled on both.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import or_, select

from aios.agents import registry as agent_ledger
from aios.agents.health import AgentStatus
from aios.config import Settings
from aios.db import session_scope
from aios.models import Agent, SyncRun, Task, TaskEvent
from aios.security import api_keys, audit
from aios.tasks.actions import revoke
from aios.tasks.create import dispatch
from aios.tasks.states import TaskState, record_events, transition, transition_many
from aios.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

#: The actor of every change sync makes (task events, agent events, audit rows).
ACTOR = "sync"
#: Most rows one step reads or changes per run: a backlog is worked off over several runs.
MAX_ROWS_PER_STEP = 1000
#: Most broker messages the lost-message check reads in one run; past this it skips (with a note).
MAX_SCAN_MESSAGES = 100_000
#: Longest a ``celery inspect`` may wait for replies (it returns early once every agent answered).
INSPECT_TIMEOUT_S = 1.0
#: Longest the broker may take to answer before the steps that need it are skipped.
BROKER_CHECK_TIMEOUT_S = 2.0
DUPLICATE_NOTE = "running on two agents"
#: Agents OFFLINE in the ledger but heard from this recently are still asked what they run.
DUPLICATE_LOOKBACK_S = 600

FOUND_KEYS = (
    "keys_expired",
    "agents_stale",
    "overdue",
    "lost_runs",
    "orphaned_runs",
    "pending",
    "lost_messages",
    "stranded",
    "duplicates",
)
CHANGED_KEYS = (
    "keys_expired",
    "agents_offline",
    "timed_out",
    "retried",
    "failed",
    "dead",
    "dispatched",
    "redispatched",
    "duplicates_recorded",
)


@dataclass
class _Run:
    celery: Celery
    settings: Settings
    found: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(FOUND_KEYS, 0))
    changed: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(CHANGED_KEYS, 0))
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Why the broker cannot be used this run (None when it answered).
    broker_down: str | None = None

    #: The live agents' ``inspect active`` replies, asked at most once per run (see :meth:`active_replies`).
    _active: dict[str, list[dict[str, Any]]] | None = None
    _active_error: str | None = None

    def need_broker(self, step: str) -> bool:
        if self.broker_down is None:
            return True
        self.notes.append(f"{step}: skipped, the broker is unreachable")
        return False

    def active_replies(self, step: str) -> dict[str, list[dict[str, Any]]] | None:
        """What every agent that may answer is running, by agent name (one ``inspect active`` broadcast
        per run, shared by the steps that need it); None, with a note, when it could not be asked.

        Agents OFFLINE in the ledger but heard from in the last ``DUPLICATE_LOOKBACK_S`` are asked too:
        a partitioned agent may still run work, and that is exactly when a task runs twice.
        """
        if self._active is None and self._active_error is None:
            recent = utcnow() - timedelta(seconds=DUPLICATE_LOOKBACK_S)
            with session_scope(self.settings.database) as session:
                live = list(
                    session.scalars(
                        select(Agent.name).where(
                            or_(Agent.status != AgentStatus.OFFLINE.value, Agent.last_heartbeat_at >= recent)
                        )
                    )
                )
            if not live:
                self._active = {}
            else:
                try:
                    replies = self.celery.control.inspect(timeout=INSPECT_TIMEOUT_S, limit=len(live)).active()
                    self._active = {agent: list(requests or []) for agent, requests in (replies or {}).items()}
                except Exception as exc:  # noqa: BLE001 - without an answer the ledger decides
                    self._active_error = f"{type(exc).__name__}: {exc}"
        if self._active_error is not None:
            self.notes.append(f"{step}: inspect failed ({self._active_error})")
            return None
        return self._active


# --------------------------------------------------------------------------- the run


def run_sync(celery: Celery, settings: Settings, *, runner: str) -> dict[str, Any]:
    """Run every step once and record the run; returns the ``sync_runs`` row as a dict.

    Never raises for a step's failure (it is in ``errors``); raises only if the run cannot be
    recorded at all (no database).
    """
    started_at, began = utcnow(), time.monotonic()
    run = _Run(celery=celery, settings=settings)
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


# --------------------------------------------------------------------------- steps


def _expire_keys(run: _Run) -> None:
    now = utcnow()
    with session_scope(run.settings.database) as session:
        expired = api_keys.expire_due(session, now, limit=MAX_ROWS_PER_STEP)
        for key in expired:
            audit.record(
                session,
                principal=ACTOR,
                role=None,
                source_ip=None,
                action="key.expire",
                target=key.id,
                outcome=audit.SUCCESS,
                detail={
                    "expires_at": isoformat(key.expires_at),
                    "rotated_to": key.rotated_to,
                    "owner_id": key.owner_id,
                },
            )
    run.found["keys_expired"] = run.changed["keys_expired"] = len(expired)


def _agents(run: _Run) -> None:
    lost = agent_ledger.sweep_offline(run.settings, run.celery)
    run.found["agents_stale"] = run.changed["agents_offline"] = len(lost)


def overdue_after_s(settings: Settings, timeout_s: int) -> float:
    """How long after its start a RUNNING task is certainly past every limit its agent enforces."""
    return timeout_s + 2 * settings.orchestrator.timeout_grace_s


def _timeouts(run: _Run) -> None:
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


def _lost_runs(run: _Run) -> None:
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
    _settle_lost(run, lost, lambda row: ("sync: agent offline" if row.status else "sync: agent unknown", None))


def _settle_lost(run: _Run, rows: list[Any], why: Callable[[Any], tuple[str, str | None]]) -> None:
    """Settle each RUNNING row by the re-route rule (fenced on the dispatch id read), count the outcomes,
    and dispatch again those left to retry. ``why(row)`` gives the event reason and what happened."""
    retry: list[str] = []
    with session_scope(run.settings.database) as session:
        for row in rows:
            reason, what = why(row)
            outcome = agent_ledger.settle_lost_run(
                session, row, agent=row.agent, reason=reason, actor=ACTOR, fence=row.dispatch_id, what=what
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


def _still_running(run: _Run, rows: Iterable[Any]) -> set[str]:
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


def _orphaned_runs(run: _Run) -> None:
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
    _settle_lost(
        run,
        orphans,
        lambda row: ("sync: orphaned run", f"agent {row.agent} no longer runs it (not in its inspect active reply)"),
    )


def _pending(run: _Run) -> None:
    cutoff = utcnow() - timedelta(seconds=run.settings.orchestrator.lost_message_grace_s)
    with session_scope(run.settings.database) as session:
        task_ids = list(
            session.scalars(
                select(Task.id)
                .where(
                    Task.state == TaskState.PENDING.value,
                    or_(Task.pending_reason.is_not(None), Task.updated_at < cutoff),
                )
                .order_by(Task.created_at, Task.id)
                .limit(MAX_ROWS_PER_STEP)
            )
        )
        # A retry decided but never published (its process died in between) waits RETRYING forever.
        stuck_retries = list(
            session.scalars(
                select(Task.id)
                .where(Task.state == TaskState.RETRYING.value, Task.updated_at < cutoff)
                .order_by(Task.updated_at, Task.id)
                .limit(MAX_ROWS_PER_STEP)
            )
        )
    run.found["pending"] = len(task_ids) + len(stuck_retries)
    if (task_ids or stuck_retries) and run.need_broker("pending"):
        outcome = dispatch(run.celery, run.settings, task_ids, actor=ACTOR)
        retried = dispatch(run.celery, run.settings, stuck_retries, actor=ACTOR, from_state=TaskState.RETRYING)
        run.changed["dispatched"] = len(outcome.queued) + len(retried.queued)


def _lost_messages(run: _Run) -> None:
    settings = run.settings
    cutoff = utcnow() - timedelta(seconds=settings.orchestrator.lost_message_grace_s)
    with session_scope(settings.database) as session:
        rows = session.execute(
            select(Task.id, Task.queue, Task.dispatch_id)
            # created_at <= queued_at: the bound lets the (state, created_at) index skip the fresh backlog.
            .where(Task.state == TaskState.QUEUED.value, Task.created_at < cutoff, Task.queued_at < cutoff)
            .order_by(Task.created_at, Task.id)
            .limit(MAX_ROWS_PER_STEP)
        ).all()
        if not rows:
            return
        agent_queues = {row.queue for row in rows if row.queue.startswith("agent.")}
        statuses = (
            {agent_ledger.agent_queue(a.name): a.status for a in session.execute(select(Agent.name, Agent.status))}
            if agent_queues
            else {}
        )
    stranded = {
        row.id
        for row in rows
        if row.queue in agent_queues and statuses.get(row.queue, AgentStatus.OFFLINE.value) == AgentStatus.OFFLINE.value
    }
    run.found["stranded"] = len(stranded)
    lost: set[str] = set()
    if settings.broker.is_sqlite:
        run.notes.append(
            "lost_messages: skipped on the embedded SQLite broker (it delivers a message a killed "
            "agent held again after broker.visibility_timeout_s); see docs/sync.md"
        )
    elif not settings.broker.is_redis:
        run.notes.append(
            "lost_messages: skipped on the filesystem transport (an agent's fetched messages "
            "leave its queue folder, so held and lost look the same); see docs/sync.md"
        )
    elif run.need_broker("lost_messages"):
        candidates = [row for row in rows if row.id not in stranded]
        missing = _missing_messages(run, candidates)
        if missing:  # look once more: a message may have been between a queue and an agent's hands
            missing &= _missing_messages(run, [row for row in candidates if row.id in missing])
        lost = missing or set()
        run.found["lost_messages"] = len(lost)
    redo = [row for row in rows if row.id in lost or row.id in stranded]
    if not redo:
        return
    with session_scope(settings.database) as session:
        moved = []
        for row in redo:
            reason = "stranded in the queue of an offline agent" if row.id in stranded else "lost message"
            moved += transition_many(
                session,
                [row.id],
                TaskState.QUEUED,
                TaskState.PENDING,
                actor=ACTOR,
                fence=row.dispatch_id,
                detail={"reason": reason, "dispatch_id": row.dispatch_id, "queue": row.queue},
                values={"pending_reason": "lost_message"},
            )
    if moved and run.broker_down is None:
        outcome = dispatch(run.celery, settings, moved, actor=ACTOR)
        run.changed["redispatched"] = len(outcome.queued)


def _duplicates(run: _Run) -> None:
    if not run.need_broker("duplicates"):
        return
    replies = run.active_replies("duplicates")
    if not replies:
        return
    duplicates = find_duplicates(replies)
    run.found["duplicates"] = len(duplicates)
    run.changed["duplicates_recorded"] = record_duplicates(run.settings, duplicates)


def find_duplicates(replies: dict[str, list[dict[str, Any]] | None]) -> dict[str, dict[str, str | None]]:
    """Task ids that ``inspect active`` replies show on more than one agent → {agent: dispatch id}."""
    seen: dict[str, dict[str, str | None]] = {}
    for agent, requests in replies.items():
        for request in requests or []:
            task_id = request.get("id")
            if task_id:
                kwargs = request.get("kwargs") if isinstance(request.get("kwargs"), dict) else {}
                seen.setdefault(task_id, {})[agent] = kwargs.get("dispatch_id")
    return {task_id: agents for task_id, agents in seen.items() if len(agents) > 1}


def record_duplicates(settings: Settings, duplicates: dict[str, dict[str, str | None]]) -> int:
    """One note event per task seen on two agents (never a second one); returns how many were new."""
    if not duplicates:
        return 0
    with session_scope(settings.database) as session:
        known = set(session.scalars(select(Task.id).where(Task.id.in_(list(duplicates)))))
        noted = {
            event.task_id
            for event in session.scalars(
                select(TaskEvent).where(
                    TaskEvent.task_id.in_(list(known)), TaskEvent.actor == ACTOR, TaskEvent.to_state.is_(None)
                )
            )
            if (event.detail or {}).get("note") == DUPLICATE_NOTE
        }
        new = sorted(known - noted)
        for task_id in new:
            record_events(
                session,
                [task_id],
                actor=ACTOR,
                from_state=None,
                to_state=None,
                detail={"note": DUPLICATE_NOTE, "agents": duplicates[task_id]},
            )
            logger.warning(
                "task %s is running on %d agents at once: %s",
                task_id,
                len(duplicates[task_id]),
                sorted(duplicates[task_id]),
            )
    return len(new)


STEPS: tuple[tuple[str, Callable[[_Run], None]], ...] = (
    ("keys", _expire_keys),
    ("agents", _agents),
    ("timeouts", _timeouts),
    ("lost_runs", _lost_runs),
    ("orphaned_runs", _orphaned_runs),
    ("pending", _pending),
    ("lost_messages", _lost_messages),
    ("duplicates", _duplicates),
)


# --------------------------------------------------------------------------- what Redis holds


def _missing_messages(run: _Run, rows: list[Any]) -> set[str]:
    """Ids of ``rows`` whose current dispatch has no message in its Redis queue and none held by an agent.

    Reads, in one MULTI transaction (an atomic snapshot), every priority list of the rows' queues and
    kombu's ``unacked`` hash: with ``acks_late`` every message an agent fetched (reserved, running, or
    waiting for its countdown) stays there until the run ended.
    """
    if not rows:
        return set()
    present = _messages_in_redis(run, {row.queue for row in rows}, {row.id for row in rows})
    if present is None:
        return set()
    return {row.id for row in rows if (row.id, row.dispatch_id) not in present}


def _messages_in_redis(run: _Run, queues: set[str], wanted: set[str]) -> set[tuple[str, str | None]] | None:
    import redis

    from aios.broker.celery_app import queue_name

    with run.celery.connection_for_read() as connection:
        channel = connection.default_channel
        prefix = getattr(channel, "global_keyprefix", "") or ""
        # A plain client on kombu's pool: kombu's own client prefixes only some commands.
        client = redis.Redis(connection_pool=channel.client.connection_pool)
        keys = sorted(
            {
                prefix + channel._q_for_pri(queue_name(run.settings, queue), step)
                for queue in queues
                for step in channel.priority_steps
            }
        )
        unacked = prefix + channel.unacked_key
        sizes = client.pipeline(transaction=False)
        for key in keys:
            sizes.llen(key)
        sizes.hlen(unacked)
        lengths = sizes.execute()
        total = sum(int(n) for n in lengths)
        if total > MAX_SCAN_MESSAGES:
            run.notes.append(f"lost_messages: skipped, {total} messages to read is more than {MAX_SCAN_MESSAGES}")
            return None
        snapshot = client.pipeline(transaction=True)
        nonempty = [key for key, n in zip(keys, lengths, strict=False) if n]
        for key in nonempty:
            snapshot.lrange(key, 0, -1)
        snapshot.hvals(unacked)
        *lists, held = snapshot.execute()
    present: set[tuple[str, str | None]] = set()
    for raw in (item for items in lists for item in items):
        present.update(_identify(raw, wanted))
    for raw in held:
        try:
            message = json.loads(raw)[0]
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        present.update(_identify(message, wanted))
    return present


def _identify(raw: Any, wanted: set[str]) -> list[tuple[str, str | None]]:
    """(task id, dispatch id) of a kombu Redis message (a JSON envelope) if its task id is ``wanted``."""
    try:
        message = json.loads(raw) if isinstance(raw, bytes | str) else raw
        task_id = message["headers"]["id"]
        if task_id not in wanted:
            return []
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return [(task_id, kwargs.get("dispatch_id"))]
    except (ValueError, TypeError, KeyError, AttributeError):
        return []
