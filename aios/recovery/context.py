"""One sync run as its steps see it: the settings, the broker, what was found and changed, and the
live agents' ``inspect`` replies (``active``, ``reserved``, ``scheduled``), each asked at most once per run and
shared by the steps that need them.

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
    "held_lost",
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

    #: The live agents' ``inspect`` replies by command (``active``, ``reserved``, ``scheduled``), each asked at
    #: most once per run (see :meth:`inspect_replies`), and why a command could not be asked.
    _replies: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    _inspect_errors: dict[str, str] = field(default_factory=dict)

    def need_broker(self, step: str) -> bool:
        if self.broker_down is None:
            return True
        self.notes.append(f"{step}: skipped, the broker is unreachable")
        return False

    def active_replies(self, step: str) -> dict[str, list[Any]] | None:
        """What every agent that may answer is running, by agent name (see :meth:`inspect_replies`)."""
        return self.inspect_replies("active", step)

    def inspect_replies(self, command: str, step: str) -> dict[str, list[Any]] | None:
        """One ``inspect <command>`` broadcast per run (``active``, ``reserved`` or ``scheduled``), shared by
        the steps that need it: ``{agent name: its list}``; None, with a note, when it could not be asked.

        Agents OFFLINE in the ledger but heard from in the last ``DUPLICATE_LOOKBACK_S`` are asked too:
        a partitioned agent may still run work, and that is exactly when a task runs twice.
        """
        if command not in self._replies and command not in self._inspect_errors:
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
                self._replies[command] = {}
            else:
                try:
                    inspect = self.celery.control.inspect(timeout=INSPECT_TIMEOUT_S, limit=len(live))
                    replies = getattr(inspect, command)()
                    self._replies[command] = {agent: list(items or []) for agent, items in (replies or {}).items()}
                except Exception as exc:  # noqa: BLE001 - without an answer the ledger decides
                    self._inspect_errors[command] = f"{type(exc).__name__}: {exc}"
        if command in self._inspect_errors:
            self.notes.append(f"{step}: inspect {command} failed ({self._inspect_errors[command]})")
            return None
        return self._replies[command]
