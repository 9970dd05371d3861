"""SQLAlchemy 2 models: the durable ledger that is AIOS's source of truth.

Schema changes go through Alembic (``aios/migrations``); ``aios db upgrade`` applies them.
The indexes serve the list endpoint's keyset pagination (newest first, optionally by state or type).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from aios.states import TaskState
from aios.timeutil import as_utc, utcnow

#: JSON on SQLite, JSONB on PostgreSQL (indexable, compact).
JsonValue = JSON().with_variant(JSONB(), "postgresql")
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
    pass


class Task(Base):
    """One unit of work, from submit to its final state."""

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    type: Mapped[str] = mapped_column(String(128))
    parameters: Mapped[dict[str, Any]] = mapped_column(JsonValue)
    #: 0-9, 9 most urgent (the API's scale; aios.priority maps it to the transport's).
    priority: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=TaskState.PENDING.value)
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
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    #: A manual retry is a new task pointing at the one it repeats.
    retry_of: Mapped[str | None] = mapped_column(String(36), ForeignKey("tasks.id"), nullable=True)
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
    detail: Mapped[dict[str, Any] | None] = mapped_column(JsonValue, nullable=True)

    task: Mapped[Task] = relationship(back_populates="events")

    __table_args__ = (Index("ix_task_events_task", "task_id", "id"),)
