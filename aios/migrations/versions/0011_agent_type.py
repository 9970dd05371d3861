"""agent type: agents.type, the original system's agent type (``POST /api/v1/agents`` with ``type``)

Revision ID: 0011_agent_type
Revises: 0010_idempotency_per_owner

A nullable column, so existing agents keep working untouched (no type). The type is also kept among the
agent's capabilities by the code (``aios.agents.registry.with_type``), which is what routing reads; the
column is what the API shows.

Plain ``ADD COLUMN`` / ``DROP COLUMN`` on both PostgreSQL and SQLite (3.35+ drops columns in place), never
Alembic's batch mode: on SQLite that rebuilds the table, and dropping the old ``agents`` table with
``PRAGMA foreign_keys=ON`` (aios.db sets it) would cascade to ``agent_events`` and delete every agent's
status history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_agent_type"
down_revision = "0010_idempotency_per_owner"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("agents", sa.Column("type", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("agents", "type")
