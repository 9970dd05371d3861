"""tasks and task_events: the task ledger and its timeline

Revision ID: 0001_tasks
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aios.models import BigId, JsonValue, UTCDateTime

revision = "0001_tasks"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("type", sa.String(128), nullable=False),
        sa.Column("parameters", JsonValue, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("result", JsonValue, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("max_retries", sa.Integer, nullable=False),
        sa.Column("timeout_s", sa.Integer, nullable=False),
        sa.Column("dispatch_id", sa.String(36), nullable=True),
        sa.Column("agent", sa.String(255), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True, unique=True),
        sa.Column("retry_of", sa.String(36), sa.ForeignKey("tasks.id"), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("queued_at", UTCDateTime, nullable=True),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("finished_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_tasks_created", "tasks", ["created_at", "id"])
    op.create_index("ix_tasks_state_created", "tasks", ["state", "created_at", "id"])
    op.create_index("ix_tasks_type_created", "tasks", ["type", "created_at", "id"])
    op.create_table(
        "task_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=True),
        sa.Column("detail", JsonValue, nullable=True),
    )
    op.create_index("ix_task_events_task", "task_events", ["task_id", "id"])


def downgrade() -> None:
    op.drop_table("task_events")
    op.drop_table("tasks")
