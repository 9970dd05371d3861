"""progress: tasks.progress and tasks.progress_message (reported by a running task)

Revision ID: 0006_progress
Revises: 0005_observability
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_progress"
down_revision = "0005_observability"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("progress", sa.Float, nullable=True))
        batch.add_column(sa.Column("progress_message", sa.String(500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("progress_message")
        batch.drop_column("progress")
