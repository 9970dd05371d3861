"""Work the broker lost track of: the sync job's ``pending``, ``lost_messages`` and ``duplicates`` steps.

* ``pending`` (:func:`dispatch_pending`): PENDING tasks the API could not publish, that waited for a
  healthy agent, whose run Celery cancelled on a broker connection loss, or that nobody dispatched for
  ``lost_message_grace_s`` (a process died after its commit) are dispatched; so are RETRYING tasks
  left that long (a process died between deciding a retry and publishing it).
* ``lost_messages`` (:func:`redispatch_lost_messages`): QUEUED tasks older than ``lost_message_grace_s``
  whose message is in no broker queue and in no live agent's hands (missing from Redis, or held in
  kombu's ``unacked`` hash by an agent that died: :func:`judge_messages`), and QUEUED tasks stranded in
  the queue of an OFFLINE or unknown agent, go back to PENDING and are dispatched again under a new
  dispatch id.
  The message check needs Redis and is skipped (with a note in ``found``) on other transports: the
  embedded SQLite broker delivers a message a killed agent held again by itself (visibility timeout),
  and messages of kombu's filesystem transport leave its queue folder when an agent fetches them, so
  held and lost look the same there. Stranded tasks are handled on every transport.
* ``duplicates`` (:func:`note_duplicates`): a task that ``inspect active`` shows on two agents at once
  gets one note event.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select

from aios.agents.health import AgentStatus
from aios.agents.registry import agent_queue
from aios.config import Settings
from aios.db import session_scope
from aios.models import Agent, Task, TaskEvent
from aios.recovery.context import ACTOR, MAX_ROWS_PER_STEP, SyncContext
from aios.tasks.create import dispatch
from aios.tasks.states import TaskState, record_events, transition_many
from aios.timeutil import utcnow

logger = logging.getLogger(__name__)

#: Most broker messages the lost-message check reads in one run; past this it skips (with a note).
MAX_SCAN_MESSAGES = 100_000
DUPLICATE_NOTE = "running on two agents"
#: Event reasons of a re-dispatch by ``lost_messages``.
LOST_MESSAGE = "lost message"
HELD_BY_LOST_AGENT = "held by a lost agent"
#: The ``inspect`` commands that together list every message a live agent holds, in the order a message
#: passes through them (a countdown waits in ``scheduled``, then ``reserved``, then ``active``): asked in
#: this order, a message moving on between two broadcasts is seen by the later one.
HOLDING_COMMANDS = ("scheduled", "reserved", "active")


def dispatch_pending(run: SyncContext) -> None:
    """``pending``: dispatch PENDING tasks that wait for it, and RETRYING tasks whose retry was never published."""
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


def redispatch_lost_messages(run: SyncContext) -> None:
    """``lost_messages``: QUEUED tasks whose message is lost or held by a dead agent, or stranded with an
    OFFLINE agent, go again."""
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
            {agent_queue(a.name): a.status for a in session.execute(select(Agent.name, Agent.status))}
            if agent_queues
            else {}
        )
    stranded = {
        row.id
        for row in rows
        if row.queue in agent_queues and statuses.get(row.queue, AgentStatus.OFFLINE.value) == AgentStatus.OFFLINE.value
    }
    run.found["stranded"] = len(stranded)
    lost: dict[str, str] = {}
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
        lost = _lost_in_redis(run, [row for row in rows if row.id not in stranded])
        run.found["lost_messages"] = len(lost)
        run.found["held_lost"] = sum(1 for reason in lost.values() if reason == HELD_BY_LOST_AGENT)
    redo = [row for row in rows if row.id in lost or row.id in stranded]
    if not redo:
        return
    with session_scope(settings.database) as session:
        moved = []
        for row in redo:
            reason = "stranded in the queue of an offline agent" if row.id in stranded else lost[row.id]
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


def note_duplicates(run: SyncContext) -> None:
    """``duplicates``: one note event per task seen on two agents at once."""
    if not run.need_broker("duplicates"):
        return
    replies = run.active_replies("duplicates")
    if not replies:
        return
    duplicates = find_duplicates(replies)
    run.found["duplicates"] = len(duplicates)
    run.changed["duplicates_recorded"] = record_duplicates(run.settings, duplicates)


def find_duplicates(replies: Mapping[str, list[dict[str, Any]] | None]) -> dict[str, dict[str, str | None]]:
    """Task ids that ``inspect active`` replies show on more than one agent → {agent: dispatch id}."""
    seen: dict[str, dict[str, str | None]] = {}
    for agent, requests in replies.items():
        for request in requests or []:
            task_id = request.get("id")
            if task_id:
                kwargs = request.get("kwargs")
                seen.setdefault(task_id, {})[agent] = kwargs.get("dispatch_id") if isinstance(kwargs, dict) else None
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


# --------------------------------------------------------------------------- what Redis holds


@dataclass(frozen=True)
class BrokerView:
    """One atomic read of Redis: the (task id, dispatch id) of the messages found in a queue list, and of
    those found only in kombu's ``unacked`` hash (fetched by an agent, not acked yet)."""

    queued: frozenset[tuple[str, str | None]] = frozenset()
    held: frozenset[tuple[str, str | None]] = frozenset()


def judge_messages(
    rows: Sequence[Any], views: Sequence[BrokerView], reported: Collection[tuple[str, str | None]] | None
) -> dict[str, str]:
    """QUEUED rows (``id``, ``dispatch_id``) whose current message is lost in every one of ``views``
    → the reason (:data:`LOST_MESSAGE` or :data:`HELD_BY_LOST_AGENT`).

    A message is lost in a view when it is in no queue list and either not in ``unacked`` either
    (missing), or in ``unacked`` but reported by no live agent (``reported``: the (task id, dispatch id)
    pairs the agents listed, dispatch id None when an agent's reply did not say it). ``reported`` None
    means the agents could not all be asked: a held message then counts as in an agent's hands, as
    before (kombu hands it out again after ``broker.visibility_timeout_s``).
    """
    lost: dict[str, str] = {}
    for row in rows:
        message = (row.id, row.dispatch_id)
        listed = reported is not None and (message in reported or (row.id, None) in reported)
        seen_held = False
        for view in views:
            if message in view.queued:
                break
            if message in view.held:
                if reported is None or listed:
                    break
                seen_held = True
        else:
            if views:
                lost[row.id] = HELD_BY_LOST_AGENT if seen_held else LOST_MESSAGE
    return lost


def held_reports(
    replies: Mapping[str, Mapping[str, list[Any]] | None], statuses: Mapping[str, str]
) -> tuple[set[tuple[str, str | None]] | None, str | None]:
    """What the live agents hold, from their ``inspect scheduled/reserved/active`` replies (``replies``:
    command → {agent: its list}) and the ledger's ``statuses`` (agent name → status): the (task id,
    dispatch id) pairs reported, or None with the reason when the replies cannot be trusted to be
    complete (a command failed, or an agent the ledger holds alive, i.e. not OFFLINE, did not answer it).
    """
    alive = {name for name, status in statuses.items() if status != AgentStatus.OFFLINE.value}
    reported: set[tuple[str, str | None]] = set()
    for command in HOLDING_COMMANDS:
        answers = replies.get(command)
        if answers is None:
            return None, f"inspect {command} failed"
        silent = sorted(alive - set(answers))
        if silent:
            return None, f"{', '.join(silent)} did not answer inspect {command}"
        for items in answers.values():
            for item in items or []:
                request = item.get("request", item) if isinstance(item, dict) else None  # scheduled wraps it
                if isinstance(request, dict) and request.get("id"):
                    kwargs = request.get("kwargs")
                    dispatch_id = kwargs.get("dispatch_id") if isinstance(kwargs, dict) else None
                    reported.add((request["id"], dispatch_id))
    return reported, None


def _lost_in_redis(run: SyncContext, rows: list[Any]) -> dict[str, str]:
    """Ids of ``rows`` whose current message is lost → the reason (see :func:`judge_messages`).

    A message an agent fetched stays in kombu's ``unacked`` hash until acked (``acks_late``), through
    its countdown (``scheduled``), its wait for a pool process (``reserved``) and its run (``active``).
    If that agent was SIGKILLed, or its site lost, before it claimed the task, the row stays QUEUED and
    kombu hands the message out again only after ``broker.visibility_timeout_s`` (two hours by default).
    So for held messages of QUEUED tasks past the grace period the live agents are asked what they hold
    (one broadcast per command and run, asked after the first read, so a message fetched before it is
    listed by its live holder); a held message none of them lists is held by a dead agent and goes
    again. This is judged only when every agent the ledger holds alive (not OFFLINE) answered every
    command: an agent that died a moment ago stays alive in the ledger until its heartbeat timeout,
    and until then its messages wait (a note says why). Every lost message is read again once (a
    message between a queue and an agent's hands in that instant is not lost).

    A wrong call costs nothing but a skipped delivery: the re-dispatch is fenced on the dispatch id read
    (a task claimed meanwhile is not QUEUED any more and is left alone), and a new dispatch id fences the
    old message off, so an agent that still held it drops it at claim time (``delivery skipped: stale
    dispatch``). One shortcut: ``inspect active`` may come from earlier in the run (shared with
    ``orphaned_runs``), so a message that went from reserved to active in between and is not claimed
    yet is judged lost; the fence decides that race. A retry re-dispatched this way runs without the
    rest of its backoff.
    """
    if not rows:
        return {}
    queues, wanted = {row.queue for row in rows}, {row.id for row in rows}
    first = _messages_in_redis(run, queues, wanted)
    if first is None:
        return {}
    reported: set[tuple[str, str | None]] | None = None
    if any((row.id, row.dispatch_id) in first.held for row in rows):
        reported = _reported_by_agents(run)
    lost = judge_messages(rows, [first], reported)
    if not lost:
        return {}
    # Look once more: a message may have been between a queue and an agent's hands.
    again = [row for row in rows if row.id in lost]
    second = _messages_in_redis(run, {row.queue for row in again}, set(lost))
    return {} if second is None else judge_messages(again, [first, second], reported)


def _reported_by_agents(run: SyncContext) -> set[tuple[str, str | None]] | None:
    """What the live agents hold (:func:`held_reports`), or None with a note when it cannot be trusted."""
    replies = {command: run.inspect_replies(command, "lost_messages") for command in HOLDING_COMMANDS}
    with session_scope(run.settings.database) as session:
        statuses = dict(session.execute(select(Agent.name, Agent.status)).tuples().all())
    reported, why = held_reports(replies, statuses)
    if reported is None:
        run.notes.append(
            f"lost_messages: messages held in unacked were counted as alive ({why}); "
            "they come back after broker.visibility_timeout_s or once the agent is OFFLINE"
        )
    return reported


def _messages_in_redis(run: SyncContext, queues: set[str], wanted: set[str]) -> BrokerView | None:
    """One atomic snapshot (a MULTI transaction) of every priority list of ``queues`` and of kombu's
    ``unacked`` hash, reduced to the messages of the task ids ``wanted``; None (with a note) when there
    are more than :data:`MAX_SCAN_MESSAGES` to read."""
    import redis

    from aios.broker.celery_app import queue_name
    from aios.broker.redis_clients import read_twice

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

        def read_sizes() -> list[Any]:
            sizes = client.pipeline(transaction=False)
            for key in keys:
                sizes.llen(key)
            sizes.hlen(unacked)
            return sizes.execute()

        # Read-only, so tried again on a fresh connection if the first meets a master that is gone.
        lengths = read_twice(read_sizes)
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
    queued: set[tuple[str, str | None]] = set()
    for raw in (item for items in lists for item in items):
        queued.update(_identify(raw, wanted))
    fetched: set[tuple[str, str | None]] = set()
    for raw in held:
        try:
            message = json.loads(raw)[0]
        except (ValueError, TypeError, IndexError, KeyError):
            continue
        fetched.update(_identify(message, wanted))
    return BrokerView(queued=frozenset(queued), held=frozenset(fetched - queued))


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
