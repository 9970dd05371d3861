"""agents and agent_events; task routing columns

Revision ID: 0003_agents
Revises: 0002_security
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aios.models import BigId, JsonValue, UTCDateTime

revision = "0003_agents"
down_revision = "0002_security"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("routing", sa.String(32), nullable=True))
        batch.add_column(sa.Column("pinned_agent", sa.String(255), nullable=True))
        batch.add_column(sa.Column("on_agent_lost", sa.String(8), nullable=False, server_default="retry"))
        batch.add_column(sa.Column("pending_reason", sa.String(64), nullable=True))
        batch.alter_column("queue", type_=sa.String(300), existing_type=sa.String(64), existing_nullable=False)
    op.create_index("ix_tasks_queue_state", "tasks", ["queue", "state"])
    op.create_index("ix_tasks_agent_state", "tasks", ["agent", "state"])
    op.create_table(
        "agents",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("capabilities", JsonValue, nullable=False),
        sa.Column("labels", JsonValue, nullable=False),
        sa.Column("weight", sa.Integer, nullable=False),
        sa.Column("max_concurrency", sa.Integer, nullable=False),
        sa.Column("admin_status", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_reason", sa.String(255), nullable=True),
        sa.Column("last_heartbeat_at", UTCDateTime, nullable=True),
        sa.Column("resources", JsonValue, nullable=True),
        sa.Column("active", sa.Integer, nullable=False),
        sa.Column("processed", sa.Integer, nullable=False),
        sa.Column("registered_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "agent_events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("agent", sa.String(255), sa.ForeignKey("agents.name", ondelete="CASCADE"), nullable=False),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("from_status", sa.String(16), nullable=True),
        sa.Column("to_status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=True),
    )
    op.create_index("ix_agent_events_agent", "agent_events", ["agent", "id"])
    op.create_table(
        "routing_state",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("state", JsonValue, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("routing_state")
    op.drop_table("agent_events")
    op.drop_table("agents")
    op.drop_index("ix_tasks_agent_state", "tasks")
    op.drop_index("ix_tasks_queue_state", "tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("queue", type_=sa.String(64), existing_type=sa.String(300), existing_nullable=False)
        batch.drop_column("pending_reason")
        batch.drop_column("on_agent_lost")
        batch.drop_column("pinned_agent")
        batch.drop_column("routing")
