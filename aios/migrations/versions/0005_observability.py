"""observability: task_stats (metrics rolled up from task_events), system_limits

Revision ID: 0005_observability
Revises: 0004_beat
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aios.models import JsonValue, UTCDateTime

revision = "0005_observability"
down_revision = "0004_beat"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_stats",
        sa.Column("type", sa.String(128), primary_key=True),
        sa.Column("series", sa.String(32), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("sum", sa.Float, nullable=False),
        sa.Column("buckets", JsonValue, nullable=False),
    )
    op.create_table(
        "stat_cursors",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("last_id", sa.BigInteger, nullable=False),
    )

    op.create_table(
        "system_limits",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("values", JsonValue, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("system_limits")
    op.drop_table("stat_cursors")
    op.drop_table("task_stats")
