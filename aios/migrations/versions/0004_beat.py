"""beat: scheduled tasks (run_at), sync_runs, schedules, backups, leases

Revision ID: 0004_beat
Revises: 0003_agents
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aios.models import BigId, JsonValue, UTCDateTime

revision = "0004_beat"
down_revision = "0003_agents"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("run_at", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("schedule_id", sa.String(36), nullable=True))
    op.create_index("ix_tasks_state_run_at", "tasks", ["state", "run_at"])
    op.create_table(
        "sync_runs",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("started_at", UTCDateTime, nullable=False),
        sa.Column("duration_s", sa.Float, nullable=False),
        sa.Column("runner", sa.String(255), nullable=False),
        sa.Column("found", JsonValue, nullable=False),
        sa.Column("changed", JsonValue, nullable=False),
        sa.Column("errors", JsonValue, nullable=False),
    )
    op.create_index("ix_sync_runs_started", "sync_runs", ["started_at", "id"])
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("cron", sa.String(128), nullable=True),
        sa.Column("interval_s", sa.Integer, nullable=True),
        sa.Column("task", JsonValue, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("last_slot_at", UTCDateTime, nullable=True),
        sa.Column("next_run_at", UTCDateTime, nullable=True),
        sa.Column("last_task_id", sa.String(36), nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "backups",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("path", sa.String(1024), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("expires_at", UTCDateTime, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("backups")
    op.drop_table("schedules")
    op.drop_index("ix_sync_runs_started", "sync_runs")
    op.drop_table("sync_runs")
    op.drop_index("ix_tasks_state_run_at", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("schedule_id")
        batch.drop_column("run_at")
