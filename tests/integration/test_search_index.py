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
from aios.tasks.search import SEARCH_INDEX, TaskFilter, _window_words, index_words, list_tasks, search_sample
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
QUERIES = [
    "50%off",
    "%off",
    "a_b",
    "_b",
    "C:\\temp",
    "\\",
    '"hi"',
    '"',
    "it's",
    "'",
    "zürich",
    "ZÜRICH",
    "日本",
    "line1\nline2",
    "\n",
    "\nline2",
    "echo\x1fboom",
    "tab\there",
    "\t",
    "needle",
    "customer-2424",
    "CUSTOMER-2424",
    "customer-2424 x",
    "upstream host-4",
    "no-such-text",
    "ec",
    "42",
    "Zürich customer",
]


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
                    connection.execute(
                        sa.insert(Task).values(
                            id=f"00000000-0000-4000-9000-{n:012d}",
                            type=row.get("type", "echo"),
                            parameters=row["parameters"],
                            priority=5,
                            queue="default",
                            state="FAILED",
                            result=row.get("result"),
                            error=row.get("error"),
                            attempts=1,
                            max_retries=3,
                            timeout_s=60,
                            on_agent_lost="retry",
                            created_at=func.now(),
                            updated_at=func.now(),
                        )
                    )
                connection.execute(sa.text("ANALYZE tasks"))
        yield settings


#: Newer rows than FILL's, none holding its texts: the newest rows a search for "upstream" meets first.
#: Seven at a time share a created_at, so the edge of a walk of the newest rows falls among equals.
GAP = 5000
FILL_GAP = f"""
INSERT INTO tasks (id, type, parameters, priority, queue, state, result, attempts, max_retries, timeout_s,
                   on_agent_lost, created_at, updated_at)
SELECT format('00000000-0000-4000-a000-%s', lpad(k::text, 12, '0')), 'noop', jsonb_build_object('i', k), 5,
       'default', 'SUCCEEDED', jsonb_build_object('ok', true), 1, 3, 3600, 'retry',
       now() + (k / 7) * interval '1 millisecond', now() + (k / 7) * interval '1 millisecond'
FROM generate_series(1, {GAP}) AS k
"""


@pytest.fixture(scope="module")
def gapped() -> Iterator[DatabaseSettings]:
    """ROWS + SPECIAL tasks, then GAP newer ones holding none of their texts, analysed; read only."""
    with own_schema(filled=True) as settings:
        with get_engine(settings).begin() as connection:
            connection.execute(sa.text(FILL_GAP))
            connection.execute(sa.text("ANALYZE tasks"))
        yield settings


def reference_ids(settings: DatabaseSettings, q: str, states: tuple[str, ...] = ()) -> list[str]:
    """The ids the search must list, newest first: the per-field search, in one query, no index."""
    with session_scope(settings) as session:
        statement = select(Task.id).where(per_field(q))
        if states:
            statement = statement.where(Task.state.in_(states))
        return list(session.scalars(statement.order_by(Task.created_at.desc(), Task.id.desc())))


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
    return or_(
        Task.type.ilike(plain, escape="\\"),
        func.coalesce(Task.error, "").ilike(plain, escape="\\"),
        cast(Task.parameters, Text).ilike(as_json, escape="\\"),
        func.coalesce(cast(Task.result, Text), "").ilike(as_json, escape="\\"),
    )


def listed_ids(settings: DatabaseSettings, q: str, limit: int = 50, states: tuple[str, ...] = ()) -> list[str]:
    """Every id the list returns for ``q``, newest first, following the cursor to the end."""
    seen: list[str] = []
    cursor = None
    with session_scope(settings) as session:
        while True:
            page, cursor = list_tasks(session, TaskFilter(q=q, states=states), limit=limit, cursor=cursor)
            seen += [task.id for task in page]
            if cursor is None:
                return seen


def sent_statements(settings: DatabaseSettings, q: str, pages: int, limit: int) -> list[list[tuple[str, Any]]]:
    """The statements over tasks list_tasks sends for each page of ``q`` (the SQL and parameters it really
    sent; not its reads of the planner's statistics)."""
    engine = get_engine(settings)
    sent: list[list[tuple[str, Any]]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if "tasks" in statement and "pg_class" not in statement:
            sent[-1].append((statement, parameters))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(settings) as session:
            cursor = None
            for _ in range(pages):
                sent.append([])
                _, cursor = list_tasks(session, TaskFilter(q=q), limit=limit, cursor=cursor)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return sent


def explain(settings: DatabaseSettings, statements: list[tuple[str, Any]], options: str = "") -> list[Any]:
    raw = get_engine(settings).raw_connection()
    try:
        explained = []
        for statement, parameters in statements:
            db_cursor = raw.cursor()
            db_cursor.execute(f"EXPLAIN {options} " + statement, parameters)
            rows = db_cursor.fetchall()
            explained.append(rows[0][0] if "JSON" in options else "\n".join(row[0] for row in rows))
        return explained
    finally:
        raw.close()


def plans(settings: DatabaseSettings, q: str, pages: int = 1, limit: int = 4) -> list[str]:
    """The EXPLAIN of each page list_tasks reads for ``q``: the plans of all its statements, one text."""
    return ["\n".join(explain(settings, page)) for page in sent_statements(settings, q, pages, limit)]


def test_the_migration_builds_a_trigram_index_over_the_searched_text_and_downgrade_drops_it():
    with own_schema(filled=False) as settings:

        def index() -> str | None:
            with get_engine(settings).connect() as connection:
                return connection.scalar(
                    sa.text(
                        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() AND indexname = :name"
                    ),
                    {"name": SEARCH_INDEX},
                )

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
        # Then it reads the newest rows by created_at, from the page's start back to the edge of the rows
        # it walks (a bounded range), and never looks the text up in the index (which collects every match)
        assert "using ix_tasks_created" in plan and "Index Cond: " in plan and "created_at >= '" in plan, plan
        assert SEARCH_INDEX not in plan, plan


@pytest.mark.parametrize("q", QUERIES)
def test_search_results_are_those_of_the_per_field_search_it_replaces(ledger, q):
    # Given rows with wildcards, quotes, backslashes, non-ASCII letters, newlines and tabs
    with session_scope(ledger) as session:
        expected = list(
            session.scalars(select(Task.id).where(per_field(q)).order_by(Task.created_at.desc(), Task.id.desc()))
        )
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


def test_the_search_statistics_keep_a_sample_of_a_thousand_search_texts(ledger):
    # Given a ledger migrated to head (migration 0008) and analysed
    with session_scope(ledger) as session:
        sample = search_sample(session)
    # Then ANALYZE kept ~1000 search texts: a text in 1 % of the rows is in about ten of them
    assert len(sample) > 500
    share = sum("upstream host-4" in value for value in sample) / len(sample)
    assert 0.003 < share < 0.03


@pytest.mark.parametrize(
    ("q", "limit"),
    [
        ("upstream", 50),
        ("upstream", 7),
        ("upstream host-4", 7),
        ("customer-42", 50),
        ("customer-2424", 3),
        ("needle", 50),
        ("noop", 50),
        ("true", 50),
        ("it's", 50),
        ("no-such-text", 50),
        ("ZÜRICH", 2),
    ],
)
def test_a_search_across_the_gap_lists_the_rows_and_order_of_the_per_field_search(gapped, q, limit):
    # Given matches only in the rows older than a gap of GAP newest rows (or only in the gap)
    # When every page is listed (windows, probes and index lookups, cursors across their edges)
    # Then the same rows in the same order as the one-query per-field search
    assert listed_ids(gapped, q, limit=limit) == reference_ids(gapped, q)


def test_a_search_with_a_state_filter_across_the_gap_lists_what_the_per_field_search_does(gapped):
    assert listed_ids(gapped, "upstream", 50, ("FAILED",)) == reference_ids(gapped, "upstream", ("FAILED",))
    assert listed_ids(gapped, "customer-42", 20, ("SUCCEEDED", "FAILED")) == reference_ids(
        gapped, "customer-42", ("SUCCEEDED", "FAILED")
    )


def test_a_window_looks_up_a_short_piece_of_the_text_only_if_the_sample_holds_it_hardly_more_often():
    # Given a sample where "upstream" is in one text in ten, "ups" also in "groups", and "eam" only in "upstream"
    sample = ["timeout talking to upstream host-1"] * 10 + ["groups of three"] * 10 + ["customer-7"] * 80
    # Then the piece is one of "upstream" as selective as the whole text; none for a text no piece matches
    assert _window_words("upstream", sample) in {("pst",), ("str",), ("tre",), ("rea",), ("eam",)}
    assert _window_words("talking groups", sample) == ()  # in no text: every piece is far more common
    assert _window_words("anything", []) == ()


#: FILL's rows a minute apart instead of a second: about three weeks, so windows span many hours.
FILL_SPREAD = FILL.replace("interval '1 second'", "interval '1 minute'")


@contextmanager
def spread_schema() -> Iterator[DatabaseSettings]:
    """FILL_SPREAD's rows, then GAP newer ones holding none of their texts, analysed."""
    with private_schema("search") as url:
        settings = DatabaseSettings(url=url)
        with get_engine(settings).begin() as connection:
            connection.execute(sa.text(FILL_SPREAD))
            connection.execute(sa.text(FILL_GAP))
            connection.execute(sa.text("ANALYZE tasks"))
        yield settings


@pytest.fixture(scope="module")
def spread() -> Iterator[DatabaseSettings]:
    """Read only: see spread_schema."""
    with spread_schema() as settings:
        yield settings


def index_columns(settings: DatabaseSettings) -> list[str]:
    with get_engine(settings).connect() as connection:
        return list(
            connection.scalars(
                sa.text(
                    "SELECT pg_get_indexdef(i.indexrelid, k, true) "
                    "FROM pg_index i, generate_series(1, i.indnkeyatts) AS k "
                    "WHERE i.indexrelid = to_regclass(:name) ORDER BY k"
                ),
                {"name": SEARCH_INDEX},
            )
        )


def test_the_search_index_is_keyed_by_creation_hour_and_downgrade_restores_the_text_only_index():
    with own_schema(filled=False) as settings:
        # Given a database migrated to head (PostgreSQL 14+, btree_gin may be created: a superuser)
        # Then the index's keys are the UTC creation hour and the search text, which keeps 0008's sample size
        hour, search_text = index_columns(settings)
        assert hour.startswith("date_bin('01:00:00'::interval, created_at, '2000-01-01 00:00:00+00'")
        assert "parameters" in search_text and "error" in search_text
        with get_engine(settings).connect() as connection:
            definition = connection.scalar(
                sa.text("SELECT pg_get_indexdef(to_regclass(:name))"), {"name": SEARCH_INDEX}
            )
        assert "USING gin" in definition and "gin_trgm_ops" in definition
        with get_engine(settings).connect() as connection:
            targets = connection.execute(
                sa.text(
                    "SELECT attnum, attstattarget FROM pg_attribute WHERE attrelid = to_regclass(:name) ORDER BY 1"
                ),
                {"name": SEARCH_INDEX},
            ).all()
        assert [tuple(row) for row in targets][1] == (2, 1000)
        # When downgraded one step / Then the index is 0007's again, over the text alone
        migrate.downgrade(settings, "0008_search_statistics")
        assert index_columns(settings) == [search_text]
        # When upgraded again / Then it is keyed by hour again
        migrate.upgrade(settings)
        assert index_columns(settings) == [hour, search_text]


def test_hour_keys_are_the_utc_hours_a_window_touches():
    from datetime import UTC, datetime, timedelta, timezone

    from aios.tasks.search import HOUR_KEYS_MAX, hour_keys

    plus_half = timezone(timedelta(hours=5, minutes=30))
    # 00:10 at UTC+5:30 is 18:40 UTC the day before: its hour, and the two up to 20:59 UTC
    assert hour_keys(datetime(2026, 3, 2, 0, 10, tzinfo=plus_half), datetime(2026, 3, 1, 20, 59, tzinfo=UTC)) == [
        datetime(2026, 3, 1, 18, tzinfo=UTC),
        datetime(2026, 3, 1, 19, tzinfo=UTC),
        datetime(2026, 3, 1, 20, tzinfo=UTC),
    ]
    # hi is excluded, but the hour it starts is listed (a key more costs little; one less would lose rows)
    assert hour_keys(datetime(2026, 3, 2, 5, 59, tzinfo=UTC), datetime(2026, 3, 2, 6, tzinfo=UTC)) == [
        datetime(2026, 3, 2, 5, tzinfo=UTC),
        datetime(2026, 3, 2, 6, tzinfo=UTC),
    ]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert len(hour_keys(start, start + timedelta(hours=HOUR_KEYS_MAX - 1)) or []) == HOUR_KEYS_MAX
    assert hour_keys(start, start + timedelta(hours=HOUR_KEYS_MAX)) is None


@pytest.mark.parametrize(
    ("q", "limit"),
    [
        ("upstream", 50),
        ("upstream", 7),
        ("upstream host-4", 20),
        ("customer-42", 50),
        ("customer-2424", 3),
        ("needle", 50),
        ("noop", 50),
        ("it's", 50),
    ],
)
def test_a_search_over_weeks_lists_the_rows_and_order_of_the_per_field_search(spread, q, limit):
    # Given matches spread over three weeks, older than a gap of GAP newest rows
    # When every page is listed (windows looked up by their hours or ranges, walks, cursors across their edges)
    # Then the same rows in the same order as the one-query per-field search
    assert listed_ids(spread, q, limit=limit) == reference_ids(spread, q)


def test_a_window_looks_up_its_hours_in_the_index_not_a_created_at_range(spread):
    # Given "upstream" in one row in ten, none of them among the newest rows
    statements = [
        statement
        for page in sent_statements(spread, "upstream", pages=2, limit=50)
        for statement in page
        if "MATERIALIZED" in statement[0]
    ]
    # When its windows are explained
    assert statements
    for plan in explain(spread, statements):
        # Then each reads the search index (by hour and text, or on a table this small by text with the hour
        # checked on the rows found: the planner's choice) and no scan of ix_tasks_created as long as the window
        assert SEARCH_INDEX in plan and "date_bin" in plan, plan
        assert "ix_tasks_created" not in plan, plan


def test_without_hour_keys_a_search_over_weeks_still_lists_what_the_per_field_search_does():
    from aios.tasks import search as task_search

    with spread_schema() as settings:
        # Given the index of migration 0007/0008 (text only), as where btree_gin may not be created
        migrate.downgrade(settings, "0008_search_statistics")
        with get_engine(settings).begin() as connection:
            connection.execute(sa.text("ANALYZE tasks"))
        task_search._statistics.clear()
        try:
            # Then windows look up their created_at range instead, with the same results
            for q, limit in (("upstream", 50), ("upstream host-4", 7), ("customer-42", 20)):
                assert listed_ids(settings, q, limit=limit) == reference_ids(settings, q)
        finally:
            task_search._statistics.clear()
