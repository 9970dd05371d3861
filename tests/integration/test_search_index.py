"""The pg_trgm search index (migration 0007) and the ``q=`` search that uses it, on PostgreSQL.

The planner's choices depend on row counts and statistics, so each test here works in a schema of its
own (migrated, filled with ``generate_series``, ANALYZEd) and drops it afterwards: the session schema
and its other tests are left alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Text, cast, event, func, or_, select

from aios import migrate
from aios.config import DatabaseSettings
from aios.db import get_engine, session_scope
from aios.models import Task
from aios.task_search import SEARCH_INDEX, TaskFilter, index_words, list_tasks, search_sample
from tests.support.schemas import private_schema

pytestmark = pytest.mark.integration

ROWS = 30_000
#: Rows like the benchmark's: every parameters holds "customer-N" (N < 3000, so each N ten times), one in
#: ten failed with an "upstream" error, the rest have a small result; newest = highest g.
FILL = f"""
INSERT INTO tasks (id, type, parameters, priority, queue, state, result, error, attempts, max_retries, timeout_s,
                   on_agent_lost, created_at, updated_at)
SELECT format('00000000-0000-4000-8000-%s', lpad(g::text, 12, '0')),
       (ARRAY['echo', 'sleep', 'etl.load'])[1 + g % 3],
       jsonb_build_object('customer', 'customer-' || (g % 3000), 'n', g),
       g % 10, 'default',
       CASE WHEN g % 10 = 0 THEN 'FAILED' ELSE 'SUCCEEDED' END,
       CASE WHEN g % 10 = 0 THEN NULL ELSE jsonb_build_object('rows', g % 1000) END,
       CASE WHEN g % 10 = 0 THEN 'timeout talking to upstream host-' || (g % 97) END,
       1, 3, 3600, 'retry',
       now() - ({ROWS} - g) * interval '1 second', now() - ({ROWS} - g) * interval '1 second'
FROM generate_series(1, {ROWS}) AS g
"""
#: Rows holding what a LIKE pattern, JSON text or the field separator could get wrong.
SPECIAL = [
    {"parameters": {"v": "50%off"}},
    {"parameters": {"v": "a_b"}},
    {"parameters": {"v": "C:\\temp"}, "error": "cannot open C:\\temp"},
    {"parameters": {"v": 'say "hi"'}, "error": 'peer said "hi"'},
    {"parameters": {"v": "it's"}},
    {"parameters": {"city": "Zürich"}, "result": {"city": "ZÜRICH"}},
    {"parameters": {"v": "日本語"}},
    {"parameters": {"v": "line1\nline2"}, "error": "trace\nline2"},
    {"parameters": {"v": "tab\there"}},
    {"type": "echo", "error": "boom", "parameters": {"customer": "customer-2424"}},
    {"type": "needle.special", "parameters": {}},
]
QUERIES = ["50%off", "%off", "a_b", "_b", "C:\\temp", "\\", '"hi"', '"', "it's", "'", "zürich", "ZÜRICH",
           "日本", "line1\nline2", "\n", "\nline2", "echo\x1fboom", "tab\there", "\t", "needle", "customer-2424",
           "CUSTOMER-2424", "customer-2424 x", "upstream host-4", "no-such-text", "ec", "42", "Zürich customer"]


@contextmanager
def own_schema(filled: bool) -> Iterator[DatabaseSettings]:
    """A schema of its own migrated to head (with ROWS benchmark-like tasks plus SPECIAL, ANALYZEd, if
    ``filled``), dropped afterwards."""
    with private_schema("search") as url:
        settings = DatabaseSettings(url=url)
        if filled:
            with get_engine(settings).begin() as connection:
                connection.execute(sa.text(FILL))
                for n, row in enumerate(SPECIAL):
                    connection.execute(sa.insert(Task).values(
                        id=f"00000000-0000-4000-9000-{n:012d}", type=row.get("type", "echo"),
                        parameters=row["parameters"], priority=5, queue="default", state="FAILED",
                        result=row.get("result"), error=row.get("error"), attempts=1, max_retries=3,
                        timeout_s=60, on_agent_lost="retry", created_at=func.now(), updated_at=func.now()))
                connection.execute(sa.text("ANALYZE tasks"))
        yield settings


@pytest.fixture(scope="module")
def ledger() -> Iterator[DatabaseSettings]:
    """ROWS + SPECIAL tasks, analysed; read only (a test that changes the schema makes its own)."""
    with own_schema(filled=True) as settings:
        yield settings


def per_field(q: str) -> Any:
    """The search condition as it was before the index: ILIKE on each field, JSON columns as their text."""

    def like(text: str) -> str:
        return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"

    plain, as_json = like(q), like(json.dumps(q, ensure_ascii=False)[1:-1])
    return or_(Task.type.ilike(plain, escape="\\"), func.coalesce(Task.error, "").ilike(plain, escape="\\"),
               cast(Task.parameters, Text).ilike(as_json, escape="\\"),
               func.coalesce(cast(Task.result, Text), "").ilike(as_json, escape="\\"))


def listed_ids(settings: DatabaseSettings, q: str, limit: int = 50) -> list[str]:
    """Every id the list returns for ``q``, newest first, following the cursor to the end."""
    seen: list[str] = []
    cursor = None
    with session_scope(settings) as session:
        while True:
            page, cursor = list_tasks(session, TaskFilter(q=q), limit=limit, cursor=cursor)
            seen += [task.id for task in page]
            if cursor is None:
                return seen


def plans(settings: DatabaseSettings, q: str, pages: int = 1, limit: int = 4) -> list[str]:
    """The EXPLAIN of each page query list_tasks sends for ``q`` (the SQL and parameters it really sent)."""
    engine = get_engine(settings)
    sent: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT TASKS."):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(settings) as session:
            cursor = None
            for _ in range(pages):
                _, cursor = list_tasks(session, TaskFilter(q=q), limit=limit, cursor=cursor)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    raw = engine.raw_connection()
    try:
        explained = []
        for statement, parameters in sent:
            db_cursor = raw.cursor()
            db_cursor.execute("EXPLAIN " + statement, parameters)
            explained.append("\n".join(row[0] for row in db_cursor.fetchall()))
        return explained
    finally:
        raw.close()


def test_the_migration_builds_a_trigram_index_over_the_searched_text_and_downgrade_drops_it():
    with own_schema(filled=False) as settings:

        def index() -> str | None:
            with get_engine(settings).connect() as connection:
                return connection.scalar(sa.text(
                    "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND indexname = :name"),
                    {"name": SEARCH_INDEX})

        # Given a database migrated to head where pg_trgm may be created (the test role is a superuser)
        definition = index()
        # Then the index is a GIN trigram index over type, error, parameters and result
        assert definition is not None
        assert "USING gin" in definition and "gin_trgm_ops" in definition
        for column in ("type", "error", "parameters", "result"):
            assert column in definition
        # When downgraded one step / Then it is gone, and search still answers (by reading rows)
        migrate.downgrade(settings, "0006_progress")
        assert index() is None
        assert listed_ids(settings, "needle") == []
        # When upgraded again / Then it is back, the same
        migrate.upgrade(settings)
        assert index() == definition


def test_a_rare_text_is_looked_up_in_the_index_on_every_page(ledger):
    # Given "needle" in one row and "customer-2424" in eleven (its word "customer" is in every row)
    with session_scope(ledger) as session:
        assert index_words("customer-2424", search_sample(session)) == ("2424",)
    # When the list query is explained / Then it reads the trigram index, also after a cursor
    for q in ("needle", "customer-2424"):
        for plan in plans(ledger, q, pages=2):
            assert SEARCH_INDEX in plan, plan


def test_a_common_text_walks_the_newest_rows_instead_of_collecting_every_match(ledger):
    # Given "upstream" in one row in ten
    # When the list query is explained, first page and after a cursor
    for plan in plans(ledger, "upstream", pages=3, limit=50):
        # Then it walks created_at newest first and stops at the page's end (no sort of every match)
        assert "Index Scan Backward using ix_tasks_created" in plan, plan
        assert SEARCH_INDEX not in plan and "Sort" not in plan, plan


@pytest.mark.parametrize("q", QUERIES)
def test_search_results_are_those_of_the_per_field_search_it_replaces(ledger, q):
    # Given rows with wildcards, quotes, backslashes, non-ASCII letters, newlines and tabs
    with session_scope(ledger) as session:
        expected = list(session.scalars(
            select(Task.id).where(per_field(q)).order_by(Task.created_at.desc(), Task.id.desc())))
    # When searched through the list (index, newest first, paged) / Then the same rows in the same order
    assert listed_ids(ledger, q) == expected


def test_the_special_rows_are_found_by_their_own_text(ledger):
    # A sanity check of the reference above: it is not vacuous for the texts that matter most.
    special = "00000000-0000-4000-9000-"
    found = {q: [i for i in listed_ids(ledger, q) if i.startswith(special)] for q in QUERIES}
    assert found["50%off"] == [special + "000000000000"] and found["%off"] == found["50%off"]
    assert found["a_b"] == [special + "000000000001"]
    assert found["C:\\temp"] == [special + "000000000002"]
    assert found['"hi"'] == [special + "000000000003"]
    assert found["it's"] == [special + "000000000004"]
    assert found["zürich"] == found["ZÜRICH"] == [special + "000000000005"]
    assert found["日本"] == [special + "000000000006"]
    assert found["line1\nline2"] == [special + "000000000007"]
    assert found["tab\there"] == [special + "000000000008"]
    assert found["echo\x1fboom"] == []  # the type and the error are separate texts
    assert found["customer-2424"][0] == special + "000000000009"
