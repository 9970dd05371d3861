"""idempotency per owner: an Idempotency-Key is unique per user, not across the whole ledger

Revision ID: 0010_idempotency_per_owner
Revises: 0009_search_by_hour

Migration 0001 made ``tasks.idempotency_key`` unique on its own, so a second user who happened to send
the same key got the first user's task (or a 409) and nothing was stored for them. The key is now
unique per owner: a unique index over ``(coalesce(owner, ''), idempotency_key)``. The coalesce makes
tasks without an owner (made by the CLI or a schedule) one scope of their own: a plain unique index
over ``(owner, idempotency_key)`` would let any number of them share a key, since SQL counts NULLs as
distinct (PostgreSQL 15's ``NULLS NOT DISTINCT`` is not on every supported server, nor on SQLite).
Both PostgreSQL and SQLite build unique indexes over expressions. Rows without a key are not indexed
(NULL keys never collide). ``aios.tasks.create.create_tasks`` looks the earlier task up the same way.

SQLite caveat for later migrations: Alembic's batch mode (which rebuilds the table for most changes on
SQLite) does not reflect an index over an expression, so a later ``batch_alter_table("tasks")`` on SQLite
drops this index silently; such a migration must create it again (as here).

Downgrade puts the global unique constraint back; it fails (and changes nothing) if two users already
share a key, which only the new rule allows: delete or re-key one of those tasks first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_idempotency_per_owner"
down_revision = "0009_search_by_hour"
branch_labels = None
depends_on = None

INDEX = "ux_tasks_owner_idempotency_key"
#: Names the unnamed constraint of 0001 on SQLite, whose batch mode drops constraints by name.
NAMING = {"uq": "uq_%(table_name)s_%(column_0_name)s"}
SQLITE_NAME = "uq_tasks_idempotency_key"


def _global_unique(bind: sa.Connection) -> str | None:
    """The name of 0001's unique constraint on idempotency_key alone (None: unnamed or absent)."""
    for constraint in sa.inspect(bind).get_unique_constraints("tasks"):
        if constraint["column_names"] == ["idempotency_key"]:
            return constraint["name"] or SQLITE_NAME
    return None


def upgrade() -> None:
    bind = op.get_bind()
    name = _global_unique(bind)
    if name is not None:
        if bind.dialect.name == "sqlite":
            with op.batch_alter_table("tasks", naming_convention=NAMING) as batch:
                batch.drop_constraint(name, type_="unique")
        else:
            op.drop_constraint(name, "tasks", type_="unique")
    op.create_index(
        INDEX,
        "tasks",
        [sa.text("coalesce(owner, '')"), "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
    )


def downgrade() -> None:
    bind = op.get_bind()
    op.drop_index(INDEX, table_name="tasks")
    if bind.dialect.name == "sqlite":
        with op.batch_alter_table("tasks", naming_convention=NAMING) as batch:
            batch.create_unique_constraint(SQLITE_NAME, ["idempotency_key"])
    else:
        op.create_unique_constraint("tasks_idempotency_key_key", "tasks", ["idempotency_key"])
