"""search by hour: the search index keyed by each task's creation hour as well as by its text

Revision ID: 0009_search_by_hour
Revises: 0008_search_statistics

A newest-first ``q=`` page is found in ``created_at`` windows (aios.tasks.search). With the trigram index
of migration 0007 alone, a window's lookup costs the text's whole posting lists, whatever the window:
GIN keeps them in heap order, not by time. ``q=upstream`` in 10 % of a million rows decodes ~100,000
entries (~10 ms), then ANDs them with a ``created_at`` range as long as the window (~7 ms for 170,000
rows), before it reads a single row.

Here the index also holds, as a second GIN key of every row, the UTC hour it was created in
(``date_bin('1 hour', created_at, ...)``, through the btree_gin extension). A window then asks for the
hours it covers: GIN intersects each hour's posting list with the text's and skips the parts of the long
lists that lie outside it, so the lookup costs the matches of those hours, not of the table (~1 ms in
the case above). An hour, not a day: a lookup of the hour or two of rows just older than the newest
ones costs their matches only, not a whole day's. The same index still answers a lookup by text
alone exactly as before (a multicolumn GIN index serves any subset of its columns equally), and each
row costs one key more to write.

Needs PostgreSQL 14+ (``date_bin``) and the btree_gin extension, which the role may not be allowed to
create (as pg_trgm in 0007). Where either is missing, or 0007 built no index, this migration logs why
and leaves the index as it is: search stays correct, and windows use the time range as before.
The index keeps its name (``ix_tasks_search_trgm``) so everything that names it stays valid.
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0009_search_by_hour"
down_revision = "0008_search_statistics"
branch_labels = None
depends_on = None

logger = logging.getLogger("aios.migrate")

INDEX = "ix_tasks_search_trgm"
BUILDING = "ix_tasks_search_trgm_building"
#: The hour key: created_at to the UTC hour. date_bin with a constant origin is IMMUTABLE (date_trunc of a
#: timestamptz is not: it depends on the session's time zone). Keep in step with aios.tasks.search._hour.
HOUR_SQL = "date_bin('1 hour'::interval, created_at, '2000-01-01 00:00:00+00'::timestamptz)"
#: Migration 0007's search text, spelled the same (the planner matches index expressions structurally).
SEARCH_TEXT_SQL = (
    "(type || E'\\x1f' || coalesce(error, '') || E'\\x1f' || parameters::text || E'\\x1f' "
    "|| coalesce(result::text, ''))"
)
#: Migration 0008's sample size of the search text.
STATISTICS = 1000
#: The lock 0007 takes around CREATE EXTENSION: one extension per database, whichever schema migrates.
_EXTENSION_LOCK = 7_007_001


def _extension_schema(bind: sa.Connection, name: str) -> str | None:
    return bind.scalar(
        sa.text(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = :name"
        ),
        {"name": name},
    )


def _key_columns(bind: sa.Connection) -> int | None:
    """How many key columns the search index has (1: 0007's, 2: this one's); None without the index."""
    return bind.scalar(
        sa.text("SELECT indnkeyatts FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": INDEX}
    )


def _create_btree_gin(bind: sa.Connection) -> str | None:
    """The schema btree_gin lives in, creating it if needed (in ``public`` when it may, as 0007 does
    with pg_trgm); None if this role may not."""
    bind.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _EXTENSION_LOCK})
    schema = _extension_schema(bind, "btree_gin")
    if schema:
        return schema
    errors = []
    for statement in (
        "CREATE EXTENSION IF NOT EXISTS btree_gin SCHEMA public",
        "CREATE EXTENSION IF NOT EXISTS btree_gin",
    ):
        try:
            with bind.begin_nested():
                bind.execute(sa.text(statement))
            return _extension_schema(bind, "btree_gin")
        except sa.exc.DBAPIError as exc:
            errors.append(str(exc.orig).strip().splitlines()[0])
    logger.warning(
        "btree_gin could not be created (%s): the tasks search index %s keeps no creation hour, so a q= "
        "search window reads the text's whole posting lists. Have a superuser (or, PostgreSQL 13+, a role "
        "with CREATE on this database) run `CREATE EXTENSION btree_gin` in it, then "
        "`aios db downgrade 0008_search_statistics && aios db upgrade`.",
        "; ".join(dict.fromkeys(errors)),
        INDEX,
    )
    return None


def _replace(columns_sql: str, text_column: int) -> None:
    """Build the search index anew over ``columns_sql`` and swap it in under the same name, with 0008's
    sample size on its text column (``text_column``, 1-based)."""
    op.execute(f"DROP INDEX IF EXISTS {BUILDING}")
    op.execute(f"CREATE INDEX {BUILDING} ON tasks USING gin ({columns_sql})")
    op.execute(f"DROP INDEX {INDEX}")
    op.execute(f"ALTER INDEX {BUILDING} RENAME TO {INDEX}")
    op.execute(f"ALTER INDEX {INDEX} ALTER COLUMN {text_column} SET STATISTICS {STATISTICS}")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or _key_columns(bind) != 1:
        return  # no search index (0007 could not build it), or already keyed by hour
    if int(bind.scalar(sa.text("SHOW server_version_num"))) < 140000:
        logger.warning(
            "PostgreSQL 14+ is needed for date_bin: the tasks search index %s keeps no creation "
            "hour, so a q= search window reads the text's whole posting lists.",
            INDEX,
        )
        return
    trgm = _extension_schema(bind, "pg_trgm")
    btree_gin = _create_btree_gin(bind)
    if trgm is None or btree_gin is None:
        return
    _replace(f'{HOUR_SQL} "{btree_gin}".timestamptz_ops, {SEARCH_TEXT_SQL} "{trgm}".gin_trgm_ops', text_column=2)


def downgrade() -> None:
    # The extension stays: other schemas of the database (or other applications) may use it.
    bind = op.get_bind()
    if bind.dialect.name != "postgresql" or _key_columns(bind) != 2:
        return
    _replace(f'{SEARCH_TEXT_SQL} "{_extension_schema(bind, "pg_trgm")}".gin_trgm_ops', text_column=1)
