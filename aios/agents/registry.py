"""Agents in the ledger: registration, heartbeats, health transitions, and the healthy set routing reads.

An agent's status changes here (a heartbeat's verdict, a clean stop, silence past the heartbeat timeout,
an operator's drain or disable); what then becomes of its tasks is :mod:`aios.recovery`'s job, which
calls in here. Nothing here moves a task.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.orm import Session

from aios.agents.health import ROUTABLE, AgentStatus, Thresholds, decide
from aios.agents.routing import Candidate
from aios.config import Settings
from aios.db import session_scope
from aios.errors import Conflict, NotFound, ValidationFailed
from aios.models import Agent, AgentEvent, Task
from aios.tasks.states import TaskState
from aios.timeutil import as_utc, utcnow

logger = logging.getLogger(__name__)

#: Seconds the healthy set is cached per process: routing costs no query per task.
HEALTHY_CACHE_S = 1.0


def thresholds(settings: Settings, session: Session) -> Thresholds:
    """The DEGRADED thresholds in force: config defaults, overlaid with /system/limits."""
    from aios.ops.limits import current

    return current(session, settings).thresholds


def _queue_safe(text: str) -> str:
    # Every transport accepts these characters in queue and exchange names (the filesystem one no more).
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def agent_queue(name: str) -> str:
    """The AIOS queue only this agent consumes (``gpu-01@host`` → ``agent.gpu-01-host``)."""
    return f"agent.{_queue_safe(name)}"


def capability_queue(capability: str) -> str:
    """The queue every agent with ``capability`` consumes (the ``shared`` policy)."""
    return f"cap.{_queue_safe(capability)}"


@dataclass(frozen=True)
class AgentSpec:
    name: str
    capabilities: list[str]
    labels: dict[str, str]
    weight: int = 1
    max_concurrency: int = 1
    #: The original system's agent ``type`` (``text_processing``): stored, shown, and always one of
    #: the agent's capabilities, so it routes as one (see :func:`with_type`).
    type: str | None = None


def with_type(capabilities: Sequence[str], agent_type: str | None) -> list[str]:
    """The capabilities an agent has: those given, plus its type. An agent registered with a type keeps
    it as a capability when it starts and announces its own list, or when an operator replaces the list,
    so the type it was registered for keeps routing to it."""
    return sorted(set(capabilities) | ({agent_type} if agent_type else set()))


#: Random hex digits in a generated agent name: 16.7 million names per type, checked against the ledger.
NAME_HEX_DIGITS = 6


def new_agent_name(session: Session, agent_type: str | None, *, owner: str | None = None) -> str:
    """A readable name nobody has: ``<type>-<6 hex>`` (``agent-<6 hex>`` without a type), after
    ``<owner>@`` for an agent key, whose agents must carry its name. The original registered agents by
    type alone and gave them ids; AIOS names agents, so it names them here. A name taken between this
    check and the insert is a 409 from :func:`register`, never a second row."""
    base = f"{owner}@" if owner else ""
    for _ in range(8):
        name = f"{base}{agent_type or 'agent'}-{secrets.token_hex(NAME_HEX_DIGITS // 2)}"
        if session.get(Agent, name) is None:
            return name
    raise Conflict(f"no free agent name for type {agent_type!r} after 8 tries; send a name", field="name")


#: PostgreSQL advisory lock that makes "count the agents, then insert one" a single step.
REGISTRATION_LOCK = 0x41494F53  # "AIOS"


def _serialize_registrations(session: Session) -> None:
    """Concurrent registrations would each count the others' rows as absent and pass ``max_agents``
    together; on PostgreSQL they take turns (held until commit). SQLite transactions begin IMMEDIATE,
    so they take turns already."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRATION_LOCK})


def register(session: Session, spec: AgentSpec, *, max_agents: int, live: bool) -> tuple[Agent, bool]:
    """Create an agent's row (or refresh it); returns it and whether it is new. 409 past ``max_agents``.

    Two ways in, counted apart, so a placeholder never stops a real agent from starting:

    * ``live``: the agent process itself, at start (an existing row is refreshed). It takes one of
      ``max_agents`` places among agents that have **ever sent a heartbeat**; placeholders do not
      count. A new agent (or a placeholder's name coming to life) claims its place at once, by
      stamping ``last_heartbeat_at`` under the registration lock, so two agents starting together
      cannot both take the last place.
    * not ``live``: a placeholder registered ahead (``POST /agents``, an operator or an agent key). A
      name in use is a 409, and it is refused once ``max_agents`` rows exist in all (placeholders and
      real agents): placeholders can never outnumber ``max_agents``.
    """
    agent = session.get(Agent, spec.name)
    if _claims_place(agent, live=live):
        _serialize_registrations(session)
        # Read again under the lock: the same name may have been registered (or come alive) meanwhile.
        agent = session.get(Agent, spec.name, populate_existing=True)
    now = utcnow()
    if agent is not None and not live:
        raise Conflict(f"agent {spec.name!r} is already registered; change it with PATCH", field="name")
    if max_agents and _claims_place(agent, live=live):
        _check_room(session, spec.name, max_agents=max_agents, live=live)
    if agent is not None:
        agent.capabilities = with_type(spec.capabilities, agent.type)
        agent.max_concurrency = spec.max_concurrency
        agent.updated_at = now
        if spec.labels:
            agent.labels = spec.labels
        if agent.last_heartbeat_at is None:
            agent.last_heartbeat_at = now  # its place is claimed (see above)
        return agent, False
    agent = Agent(
        name=spec.name,
        type=spec.type,
        capabilities=with_type(spec.capabilities, spec.type),
        labels=spec.labels,
        weight=spec.weight,
        max_concurrency=spec.max_concurrency,
        admin_status="ACTIVE",
        status=AgentStatus.OFFLINE.value,
        status_reason="registered, no heartbeat yet",
        active=0,
        processed=0,
        registered_at=now,
        updated_at=now,
        last_heartbeat_at=now if live else None,
    )
    session.add(agent)
    session.flush()
    return agent, True


def _claims_place(agent: Agent | None, *, live: bool) -> bool:
    """Whether registering takes one of ``max_agents`` places: a new row, or a placeholder coming alive."""
    return agent is None or (live and agent.last_heartbeat_at is None)


def _check_room(session: Session, name: str, *, max_agents: int, live: bool) -> None:
    """409 when ``name`` would be one agent too many (see :func:`register` for what is counted)."""
    if live:
        count = (
            session.scalar(
                select(func.count()).select_from(Agent).where(Agent.last_heartbeat_at.is_not(None), Agent.name != name)
            )
            or 0
        )
        if count >= max_agents:
            raise Conflict(
                f"orchestrator.max_agents ({max_agents}) agents have sent heartbeats already; "
                "delete an offline one (DELETE /api/v1/agents/{name}) or raise the limit",
                field="name",
            )
        return
    count = session.scalar(select(func.count()).select_from(Agent)) or 0
    if count >= max_agents:
        raise Conflict(
            f"orchestrator.max_agents ({max_agents}) agents are registered already (placeholders "
            "registered ahead count too); delete an offline one or raise the limit",
            field="name",
        )


def get_agent(session: Session, name: str, *, for_update: bool = False) -> Agent:
    """The agent's row; ``for_update`` locks it until the transaction ends, for a read-decide-write of
    its status (a heartbeat and an operator's PATCH must not each overwrite what the other decided)."""
    agent = session.get(Agent, name, with_for_update=for_update or None)
    if agent is None:
        raise NotFound(f"no agent named {name!r}", field="name")
    return agent


def _set_status(session: Session, agent: Agent, status: AgentStatus, reason: str) -> AgentStatus | None:
    """Apply a verdict; returns the old status if it changed (and records an agent event)."""
    old = agent.status
    agent.status_reason = reason[:255]
    if old == status.value:
        return None
    agent.status = status.value
    session.add(AgentEvent(agent=agent.name, at=utcnow(), from_status=old, to_status=status.value, reason=reason[:255]))
    return AgentStatus(old)


def reevaluate(session: Session, settings: Settings, agent: Agent) -> AgentStatus | None:
    verdict = decide(
        admin_status=agent.admin_status,
        last_heartbeat_at=as_utc(agent.last_heartbeat_at),
        now=utcnow(),
        heartbeat_timeout_s=settings.agents.effective_heartbeat_timeout_s,
        resources=agent.resources,
        active=agent.active,
        max_concurrency=agent.max_concurrency,
        thresholds=thresholds(settings, session),
    )
    return _set_status(session, agent, verdict.status, verdict.reason)


@dataclass(frozen=True)
class HeartbeatOutcome:
    old: AgentStatus | None
    new: AgentStatus

    @property
    def became_routable(self) -> bool:
        return self.old is not None and self.old not in ROUTABLE and self.new in ROUTABLE


def record_heartbeat(
    settings: Settings, name: str, *, resources: dict[str, Any], active: int, processed: int
) -> HeartbeatOutcome:
    with session_scope(settings.database) as session:
        agent = get_agent(session, name, for_update=True)
        agent.last_heartbeat_at, agent.resources = utcnow(), resources
        agent.active, agent.processed, agent.updated_at = active, processed, utcnow()
        old = reevaluate(session, settings, agent)
        return HeartbeatOutcome(old=old, new=AgentStatus(agent.status))


def mark_offline(settings: Settings, name: str, reason: str) -> bool:
    """Mark an agent OFFLINE now (a clean shutdown); True if this call changed it (its work is then
    re-routed by the caller, :func:`aios.recovery.reroute.agent_stopped`)."""
    with session_scope(settings.database) as session:
        won = (
            session.execute(
                update(Agent)
                .where(Agent.name == name, Agent.status != AgentStatus.OFFLINE.value)
                .values(status=AgentStatus.OFFLINE.value, status_reason=reason[:255], updated_at=utcnow())
                .returning(Agent.status)
            ).first()
            is not None
        )
        if won:
            session.add(AgentEvent(agent=name, at=utcnow(), from_status=None, to_status="OFFLINE", reason=reason[:255]))
    forget_healthy_cache()
    return won


def mark_silent_offline(settings: Settings) -> Iterator[str]:
    """Mark agents past the heartbeat timeout OFFLINE (bounded, idempotent), yielding each one this
    process moved as soon as that is committed, so the caller moves its work before the next is marked.

    One conditional UPDATE per agent: when several processes sweep at once, each agent is won by one of
    them, which alone re-routes its work (:func:`aios.recovery.reroute.sweep_offline`).
    """
    timeout_s = settings.agents.effective_heartbeat_timeout_s
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    with session_scope(settings.database) as session:
        stale = list(
            session.scalars(
                select(Agent.name)
                .where(
                    Agent.status != AgentStatus.OFFLINE.value,
                    or_(Agent.last_heartbeat_at.is_(None), Agent.last_heartbeat_at < cutoff),
                )
                .limit(100)
            )
        )
    lost = False
    for name in stale:
        with session_scope(settings.database) as session:
            row = session.execute(
                update(Agent)
                .where(
                    Agent.name == name,
                    Agent.status != AgentStatus.OFFLINE.value,
                    or_(Agent.last_heartbeat_at.is_(None), Agent.last_heartbeat_at < cutoff),
                )
                .values(
                    status=AgentStatus.OFFLINE.value,
                    updated_at=utcnow(),
                    status_reason=f"no heartbeat for more than {timeout_s:g}s",
                )
                .returning(Agent.name)
            ).first()
            if row is None:
                continue  # someone else got there first, or it came back
            session.add(
                AgentEvent(
                    agent=name,
                    at=utcnow(),
                    from_status=None,
                    to_status="OFFLINE",
                    reason=f"no heartbeat for more than {timeout_s:g}s",
                )
            )
        lost = True
        logger.warning("agent %s is OFFLINE (no heartbeat for %gs); re-routing its work", name, timeout_s)
        yield name
    if lost:
        forget_healthy_cache()


#: What an operator may set an agent to (PATCH /agents/{name} and the dashboard): ONLINE undoes the other two.
ADMIN_STATUSES = ("ONLINE", "DRAINING", "DISABLED")

#: The original system's agent statuses that ``PUT /agents/{id}`` accepts, and the one AIOS sets for each.
#: IDLE meant "ready for work"; OFFLINE and ERROR meant "send it nothing", which is AIOS's DISABLED.
ORIGINAL_STATUSES: dict[str, str] = {"IDLE": "ONLINE", "OFFLINE": "DISABLED", "ERROR": "DISABLED"}

#: Statuses AIOS decides itself from heartbeats (:func:`aios.agents.health.decide`): nobody sets them.
COMPUTED_STATUSES = ("BUSY", "DEGRADED")

#: Every status ``PUT /agents/{id}`` accepts: the original's and AIOS's own.
SETTABLE_STATUSES = (*ORIGINAL_STATUSES, *ADMIN_STATUSES)


def admin_status_for(status: str) -> str:
    """The AIOS admin status (one of :data:`ADMIN_STATUSES`) an original or AIOS ``status`` asks for.

    409 for a status AIOS computes (the original let clients report BUSY; here the heartbeats say it),
    422 naming the accepted values for anything else."""
    if status in ADMIN_STATUSES:
        return status
    if status in ORIGINAL_STATUSES:
        return ORIGINAL_STATUSES[status]
    if status in COMPUTED_STATUSES:
        raise Conflict(
            f"status {status} cannot be set: AIOS computes it from the agent's heartbeats (BUSY: running "
            f"max_concurrency tasks; DEGRADED: over a resource threshold); send IDLE (or ONLINE) to enable "
            f"the agent, OFFLINE or ERROR (or DISABLED) to disable it, DRAINING to drain it",
            field="status",
        )
    raise ValidationFailed(f"status: must be one of {', '.join(SETTABLE_STATUSES)} (got {status!r})", field="status")


@dataclass(frozen=True)
class AgentChange:
    """What an operator changes on an agent (PATCH or PUT /agents/{name}, the dashboard); None: unchanged.

    ``status`` is one of :data:`ADMIN_STATUSES` (:func:`admin_status_for` maps the original's)."""

    status: str | None = None
    weight: int | None = None
    capabilities: list[str] | None = None
    labels: dict[str, str] | None = None


def change_agent(session: Session, settings: Settings, name: str, change: AgentChange) -> Agent:
    """Apply an operator's change to the agent's row (locked, so a heartbeat's verdict and this one do
    not overwrite each other) and decide its status again. The one place an operator changes an agent:
    the API's PATCH and PUT and the dashboard all come here.

    A drained or disabled agent takes no new work; moving what waits in its own queue to other agents,
    and forgetting the healthy-set cache, is the caller's next step, after commit
    (:func:`aios.recovery.reroute.admin_status_changed`)."""
    if change.status is not None and change.status not in ADMIN_STATUSES:
        raise ValidationFailed(f"status: must be one of {', '.join(ADMIN_STATUSES)}", field="status")
    agent = get_agent(session, name, for_update=True)
    if change.status is not None:
        agent.admin_status = "ACTIVE" if change.status == "ONLINE" else change.status
    if change.weight is not None:
        agent.weight = change.weight
    if change.capabilities is not None:
        agent.capabilities = with_type(change.capabilities, agent.type)
    if change.labels is not None:
        agent.labels = change.labels
    agent.updated_at = utcnow()
    reevaluate(session, settings, agent)
    return agent


def set_admin_status(settings: Settings, name: str, status: str) -> str:
    """Drain, disable or re-enable an agent (:func:`change_agent`); returns its health status after."""
    with session_scope(settings.database) as session:
        health = change_agent(session, settings, name, AgentChange(status=status)).status
    forget_healthy_cache()
    return health


# --------------------------------------------------------------------------- the healthy set

_cache_lock = threading.Lock()
_cache: dict[str, tuple[float, list[Candidate]]] = {}


def forget_healthy_cache() -> None:
    with _cache_lock:
        _cache.clear()


def healthy_agents(settings: Settings) -> list[Candidate]:
    """Routable agents with a fresh heartbeat, and their load; cached for about a second."""
    key = settings.database.url
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit and now - hit[0] < HEALTHY_CACHE_S:
            return hit[1]
    cutoff = utcnow() - timedelta(seconds=settings.agents.effective_heartbeat_timeout_s)
    with session_scope(settings.database) as session:
        rows = session.execute(
            select(Agent.name, Agent.capabilities, Agent.weight).where(
                Agent.status.in_([s.value for s in ROUTABLE]), Agent.last_heartbeat_at >= cutoff
            )
        ).all()
        loads = (
            dict(
                session.execute(
                    select(Task.queue, func.count())
                    .where(
                        Task.state.in_([TaskState.QUEUED.value, TaskState.RUNNING.value]),
                        Task.queue.in_([agent_queue(r.name) for r in rows]),
                    )
                    .group_by(Task.queue)
                ).all()
            )
            if rows
            else {}
        )
    candidates = [
        Candidate(
            name=r.name,
            capabilities=frozenset(r.capabilities or []),
            weight=max(1, r.weight),
            load=int(loads.get(agent_queue(r.name), 0)),
        )
        for r in rows
    ]
    if candidates:  # never cache "nobody": a new agent must be routable at once
        with _cache_lock:
            _cache[key] = (now, candidates)
    return candidates


def waiting_task_ids(settings: Settings, capabilities: Sequence[str], limit: int = 1000) -> list[str]:
    """PENDING tasks that wait for an agent with one of ``capabilities``, oldest first."""
    with session_scope(settings.database) as session:
        return list(
            session.scalars(
                select(Task.id)
                .where(
                    Task.state == TaskState.PENDING.value,
                    Task.pending_reason == "no_healthy_agent",
                    Task.type.in_(list(capabilities)),
                )
                .order_by(Task.created_at, Task.id)
                .limit(limit)
            )
        )
