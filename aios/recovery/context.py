"""One sync run as its steps see it: the settings, the broker, what was found and changed, and the
live agents' ``inspect active`` replies, asked at most once per run and shared by the steps that need them.

Each step module (:mod:`~aios.recovery.timeouts`, :mod:`~aios.recovery.lost_runs`,
:mod:`~aios.recovery.messages`) takes a :class:`SyncContext` and records its counts in it;
:mod:`aios.recovery.sync` makes one per run and stores what it holds at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from celery import Celery
from sqlalchemy import or_, select

from aios.agents.health import AgentStatus
from aios.config import Settings
from aios.db import session_scope
from aios.models import Agent
from aios.timeutil import utcnow

#: The actor of every change sync makes (task events, agent events, audit rows).
ACTOR = "sync"
#: Most rows one step reads or changes per run: a backlog is worked off over several runs.
MAX_ROWS_PER_STEP = 1000
#: Longest a ``celery inspect`` may wait for replies (it returns early once every agent answered).
INSPECT_TIMEOUT_S = 1.0
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
class SyncContext:
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
