"""SQLAlchemy 2 models: the durable ledger that is AIOS's source of truth.

Schema changes go through Alembic (``aios/migrations``); ``aios db upgrade`` applies them.
The indexes serve the list endpoint's keyset pagination (newest first, optionally by state or type).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from aios.timeutil import as_utc, utcnow

#: JSON on SQLite, JSONB on PostgreSQL (indexable, compact).
JsonValue = JSON().with_variant(JSONB(), "postgresql")
#: Like JsonValue, but Python None is SQL NULL whichever way the row is written (the ORM leaves a None
#: out, a Core multi-row INSERT binds it): timeline details are written both ways.
JsonOrNull = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
#: BIGINT identity on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware UTC, on SQLite too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        value = as_utc(value)
        if value is not None and dialect.name == "sqlite":
            return value.replace(tzinfo=None)  # stored naive, always UTC, so text order = time order
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return as_utc(value)


class Base(DeclarativeBase):
    if TYPE_CHECKING:
        # SQLAlchemy types it as any FromClause (a class may map a join or a select); every model
        # here maps its own Table, which Core's insert() and update() take.
        __table__: ClassVar[Table]


class Task(Base):
    """One unit of work, from submit to its final state."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    parameters: Mapped[dict[str, Any]] = mapped_column(JsonValue)
    #: 0-9, 9 most urgent (the API's scale; aios.broker.priority maps it to the transport's).
    priority: Mapped[int] = mapped_column(Integer)
    #: The AIOS queue it was published to: a named queue, ``agent.<name>`` or ``cap.<capability>``.
    queue: Mapped[str] = mapped_column(String(300))
    #: A :class:`aios.tasks.states.TaskState` value; only that module changes it (it imports this one,
    #: so the default is spelled out here rather than imported).
    state: Mapped[str] = mapped_column(String(16), default="PENDING")
    result: Mapped[Any | None] = mapped_column(JsonValue, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: Runs started so far (1 after the first claim).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_retries: Mapped[int] = mapped_column(Integer)
    timeout_s: Mapped[int] = mapped_column(Integer)
    #: Changes with every publish; a worker may only act on the dispatch it was given (the fence).
    dispatch_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    #: The Celery hostname of the agent that claimed the current run.
    agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: Unique per owner (a unique index over ``coalesce(owner, '')`` and the key, migration 0010): two
    #: users may send the same key and each gets their own task.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: A manual retry is a new task pointing at the one it repeats.
    retry_of: Mapped[str | None] = mapped_column(String(36), ForeignKey("tasks.id"), nullable=True)
    #: The user that submitted it (directly or through one of their API keys).
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: How the task finds an agent: a policy of aios.agents.routing, "queue" (an explicit queue) or "pinned".
    routing: Mapped[str | None] = mapped_column(String(32), nullable=True)
    #: The agent the task was pinned to (``agent`` field at submit), if any.
    pinned_agent: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: What to do with a RUNNING task whose agent goes OFFLINE: "retry" (an attempt) or "fail".
    on_agent_lost: Mapped[str] = mapped_column(String(8), default="retry")
    #: Why a PENDING task waits (e.g. "no_healthy_agent", "publish_failed").
    pending_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: A SCHEDULED task becomes PENDING (and is dispatched) at this time.
    run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: The periodic schedule that created it, if any.
    schedule_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    #: Percent done (0-100) the current run last reported (aios.tasks.progress); cleared when a run starts.
    progress: Mapped[float | None] = mapped_column(Float, nullable=True)
    progress_message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    events: Mapped[list[TaskEvent]] = relationship(
        back_populates="task", order_by="TaskEvent.id", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_tasks_created", "created_at", "id"),
        Index("ix_tasks_state_created", "state", "created_at", "id"),
        Index("ix_tasks_type_created", "type", "created_at", "id"),
        Index("ix_tasks_queue_state", "queue", "state"),
        Index("ix_tasks_agent_state", "agent", "state"),
        Index("ix_tasks_state_run_at", "state", "run_at"),
        Index(
            "ux_tasks_owner_idempotency_key",
            text("coalesce(owner, '')"),
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
            sqlite_where=text("idempotency_key IS NOT NULL"),
        ),
    )


class TaskEvent(Base):
    """One line of a task's timeline: a state change (or a note when ``to_state`` is null)."""

    __tablename__ = "task_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(String(36), ForeignKey("tasks.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: Who made the change: "api", "worker:<hostname>", "cli", "sync", ...
    actor: Mapped[str] = mapped_column(String(128))
    from_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    detail: Mapped[dict[str, Any] | None] = mapped_column(JsonOrNull, nullable=True)

    task: Mapped[Task] = relationship(back_populates="events")

    __table_args__ = (Index("ix_task_events_task", "task_id", "id"),)


class User(Base):
    """A person (or service account) who logs in with a password and owns API keys."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key, stored only as a SHA-256 hash; the plaintext is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    #: The public part of the key (``aios_<prefix>_<secret>``), used to find the row.
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[int] = mapped_column(Integer, ForeignKey("users.id", ondelete="CASCADE"))
    #: ACTIVE or REVOKED; expiry (including a rotation's grace period) is ``expires_at``.
    state: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    rotated_to: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_used_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)

    owner: Mapped[User] = relationship()


class AuditEntry(Base):
    """One write, login or control action: who, from where, what, on what, and how it ended."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    principal: Mapped[str] = mapped_column(String(128))
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    source_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(255), nullable=True)
    #: success, denied (401/403/429), failure (any other error)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JsonValue, nullable=True)

    __table_args__ = (
        Index("ix_audit_at", "at", "id"),
        Index("ix_audit_principal_at", "principal", "at", "id"),
        Index("ix_audit_action_at", "action", "at", "id"),
    )


class Counter(Base):
    """Expiring counters and flags (rate limits, login lockouts, revoked tokens) when there is no Redis."""

    __tablename__ = "counters"

    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Agent(Base):
    """An agent (a Celery worker): what it can run, how it is doing, and what an operator set."""

    __tablename__ = "agents"

    #: The Celery hostname, e.g. ``gpu-01@host``.
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: The original system's agent type (``text_processing``), if it was registered with one; always
    #: among ``capabilities`` too (:func:`aios.agents.registry.with_type`).
    type: Mapped[str | None] = mapped_column(String(128), nullable=True)
    capabilities: Mapped[list[str]] = mapped_column(JsonValue, default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    max_concurrency: Mapped[int] = mapped_column(Integer, default=1)
    #: What an operator asked for: ACTIVE, DRAINING or DISABLED.
    admin_status: Mapped[str] = mapped_column(String(16), default="ACTIVE")
    #: What aios.agents.health decided: ONLINE, BUSY, DEGRADED, DRAINING, DISABLED or OFFLINE.
    status: Mapped[str] = mapped_column(String(16), default="OFFLINE")
    status_reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    #: psutil figures of the last heartbeat (cpu_pct, memory_pct, load_avg, disk_pct, rss_bytes).
    resources: Mapped[dict[str, Any] | None] = mapped_column(JsonValue, nullable=True)
    active: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AgentEvent(Base):
    """A change of an agent's status, with the reason."""

    __tablename__ = "agent_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    agent: Mapped[str] = mapped_column(String(255), ForeignKey("agents.name", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(255), nullable=True)

    __table_args__ = (Index("ix_agent_events_agent", "agent", "id"),)


class RoutingState(Base):
    """Shared routing state (the round-robin cursor, weighted credits) when there is no Redis."""

    __tablename__ = "routing_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[dict[str, Any]] = mapped_column(JsonValue)


class SyncRun(Base):
    """One run of the sync job: when, how long, what it found and changed, what went wrong."""

    __tablename__ = "sync_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    duration_s: Mapped[float] = mapped_column(Float, default=0.0)
    #: Which process ran it (beat leader, or an admin's "run now").
    runner: Mapped[str] = mapped_column(String(255))
    found: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    changed: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    errors: Mapped[list[str]] = mapped_column(JsonValue, default=list)

    __table_args__ = (Index("ix_sync_runs_started", "started_at", "id"),)


class Schedule(Base):
    """A periodic task: every ``interval_s`` seconds or on a ``cron`` expression."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    cron: Mapped[str | None] = mapped_column(String(128), nullable=True)
    interval_s: Mapped[int | None] = mapped_column(Integer, nullable=True)
    #: The task each firing creates: {type, parameters, priority, ...} as for POST /tasks.
    task: Mapped[dict[str, Any]] = mapped_column(JsonValue)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: The slot (scheduled time) of the last firing: a slot never fires twice, even across leaders.
    last_slot_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_task_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Backup(Base):
    """A database backup file (or a failed attempt at one)."""

    __tablename__ = "backups"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: ok, failed, or deleted (retention removed the file)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Lease(Base):
    """A named, expiring lock held by one process (the beat leader on the embedded default)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TaskStat(Base):
    """Durable, cluster-wide task metrics, rolled up from ``task_events`` (see :mod:`aios.tasks.stats`).

    One row per task type and series: ``finished:<STATE>`` (a count), ``run`` and ``wait`` (histograms
    of run time and queue wait in seconds: ``count``, ``sum`` and cumulative ``buckets``).
    """

    __tablename__ = "task_stats"

    type: Mapped[str] = mapped_column(String(128), primary_key=True)
    series: Mapped[str] = mapped_column(String(32), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    sum: Mapped[float] = mapped_column(Float, default=0.0)
    buckets: Mapped[list[int]] = mapped_column(JsonValue, default=list)


class StatCursor(Base):
    """How far a rollup has read its source (the last ``task_events.id`` counted)."""

    __tablename__ = "stat_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_id: Mapped[int] = mapped_column(BigInteger, default=0)


class SystemLimitsRow(Base):
    """The limits an admin set through ``PUT /api/v1/system/limits`` (one row; config gives defaults)."""

    __tablename__ = "system_limits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    values: Mapped[dict[str, Any]] = mapped_column(JsonValue, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
