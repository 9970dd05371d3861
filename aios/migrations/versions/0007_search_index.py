"""search index: a pg_trgm GIN index over the text ``q=`` searches (PostgreSQL only)

Revision ID: 0007_search_index
Revises: 0006_progress

``GET /api/v1/tasks?q=`` is a case-insensitive substring search (``ILIKE '%text%'``): no b-tree can
serve it, so without this index a rare term reads the whole ledger. A trigram GIN index answers
``ILIKE`` over one expression, so the search text is one expression here and, spelled the same,
in ``aios.tasks.search._search_text`` (the planner matches index expressions structurally; if one
changes, the other must, in a new migration).

The index needs the pg_trgm extension. Creating it needs a privilege the database role may lack
(CREATE on the database for a trusted extension, PostgreSQL 13+): then this migration logs a warning
and skips the index, and search works as before, only slowly. Run this migration again after
``CREATE EXTENSION pg_trgm`` (``aios db downgrade 0006_progress`` then ``aios db upgrade``), or create
the index by hand (docs/api.md, "Search"). SQLite: nothing to do; search scans there.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0007_search_index"
down_revision = "0006_progress"
branch_labels = None
depends_on = None

logger = logging.getLogger("aios.migrate")

INDEX = "ix_tasks_search_trgm"
#: The searched text: type, error, parameters and result (JSON text), joined by the ASCII unit separator.
#: Keep in step with aios.tasks.search._search_text.
SEARCH_TEXT_SQL = (
    "(type || E'\\x1f' || coalesce(error, '') || E'\\x1f' || parameters::text || E'\\x1f' "
    "|| coalesce(result::text, ''))"
)
#: Any constant: serializes concurrent migrations of several schemas of one database at the
#: CREATE EXTENSION (an extension exists once per database, whichever schema it lives in).
_EXTENSION_LOCK = 7_007_001


def _trgm_schema(bind: sa.Connection) -> str | None:
    return bind.scalar(
        sa.text(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'pg_trgm'"
        )
    )


def _create_trgm(bind: sa.Connection) -> str | None:
    """The schema pg_trgm lives in, creating it if needed; None if this role may not.

    Created in ``public`` when it can be (not in the first schema of the search_path, which may be
    an application or test schema that is dropped later, taking the extension and every other
    schema's index with it), else in the current schema.
    """
    bind.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EXTENSION_LOCK})
    schema = _trgm_schema(bind)
    if schema:
        return schema
    errors = []
    for statement in ("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public", "CREATE EXTENSION IF NOT EXISTS pg_trgm"):
        try:
            with bind.begin_nested():
                bind.execute(sa.text(statement))
            return _trgm_schema(bind)
        except sa.exc.DBAPIError as exc:
            errors.append(str(exc.orig).strip().splitlines()[0])
    logger.warning(
        "pg_trgm could not be created (%s): the tasks search index %s was NOT built, so q= search reads "
        "the whole table. Have a superuser (or, PostgreSQL 13+, a role with CREATE on this database) run "
        "`CREATE EXTENSION pg_trgm` in it, then `aios db downgrade 0006_progress && aios db upgrade`.",
        "; ".join(dict.fromkeys(errors)),
        INDEX,
    )
    return None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    schema = _create_trgm(bind)
    if schema is None:
        return
    # IF NOT EXISTS: on a large ledger an operator may build it beforehand with CREATE INDEX
    # CONCURRENTLY (no write lock), which a migration cannot do inside its transaction.
    opclass = f'"{schema}".gin_trgm_ops'
    op.execute(f"CREATE INDEX IF NOT EXISTS {INDEX} ON tasks USING gin ({SEARCH_TEXT_SQL} {opclass})")


def downgrade() -> None:
    # The extension stays: other schemas of the database (or other applications) may use it.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP INDEX IF EXISTS {INDEX}")
