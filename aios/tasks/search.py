"""Finding tasks in the ledger: the filter, the sort orders, and the keyset cursor that pages through them.

Shared by the list endpoint and bulk actions (:mod:`aios.tasks.bulk`), so "the tasks this filter selects"
means the same thing to both. Every page costs one ordered index scan plus the filter; no OFFSET.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar, TypeVarTuple

from sqlalchemy import (
    ColumnClause,
    ColumnElement,
    DateTime,
    Engine,
    Select,
    Text,
    and_,
    cast,
    func,
    literal_column,
    or_,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import array
from sqlalchemy.orm import Session
from sqlalchemy.sql.util import ClauseAdapter

from aios.errors import ValidationFailed
from aios.models import Task
from aios.sandbox.run import COMMAND_TYPE
from aios.text import storable_text
from aios.timeutil import isoformat, parse_iso

#: Bounds of a search text: one character matches nearly everything; a long one is a mistake.
Q_MIN, Q_MAX = 2, 200
#: The sort orders of the list; a leading "-" is descending. Ties break on created_at, then id.
SORTS = ("-created_at", "created_at", "-priority", "priority", "-updated_at", "updated_at")
DEFAULT_SORT = "-created_at"


@dataclass(frozen=True)
class TaskFilter:
    """Which tasks: every field given narrows the set (AND); an empty filter selects every task."""

    states: tuple[str, ...] = ()
    type: str | None = None
    priority: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    #: Case-insensitive substring of the type, the parameters or result (as JSON text), or the error.
    q: str | None = None
    #: The agent that ran the task or the one it is pinned to (agent names are Celery hostnames).
    agent: str | None = None
    #: The periodic schedule that created it.
    schedule: str | None = None
    owner: str | None = None
    queue: str | None = None
    ids: tuple[str, ...] = ()

    def is_empty(self) -> bool:
        return not any(
            (
                self.states,
                self.type,
                self.priority is not None,
                self.created_after,
                self.created_before,
                self.q,
                self.agent,
                self.schedule,
                self.owner,
                self.queue,
                self.ids,
            )
        )


def check_q(q: str, *, field: str = "q") -> str:
    if not Q_MIN <= len(q) <= Q_MAX:
        raise ValidationFailed(f"{field}: search text must be {Q_MIN}-{Q_MAX} characters (got {len(q)})", field=field)
    return q


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, with its own %, _ and \\ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


#: The pg_trgm GIN index over :func:`_search_text` (migration 0007).
SEARCH_INDEX = "ix_tasks_search_trgm"
_SEPARATOR = "\x1f"
#: A word of the search text found in more than this share of the rows ANALYZE sampled is "common":
#: leaving it out of the index lookup at most about doubles the rows checked, and saves reading a
#: posting list about as long as the table.
COMMON_WORD_SHARE = 0.5
#: What pg_trgm indexes: runs of letters and digits; a run under 3 characters makes no trigram alone.
_WORD = re.compile(r"[^\W_]{3,}")
#: How long a process reuses the sample of search texts it read from pg_stats (ANALYZE renews it when
#: about a tenth of the table has changed, so minutes are fresh enough).
SAMPLE_MAX_AGE_S = 300.0
#: The planner's sample of the search text: the histogram ANALYZE keeps for the index expression.
_SAMPLE_SQL = text("""
    SELECT s.histogram_bounds::text::text[]
    FROM pg_class c
    JOIN pg_namespace ns ON ns.oid = c.relnamespace
    JOIN pg_stats s ON s.schemaname = ns.nspname AND s.tablename = c.relname AND s.attname = 'expr'
    WHERE c.oid = to_regclass(:index)
""")
#: The planner's quantiles of tasks.created_at (ANALYZE's equi-depth histogram, oldest first): each
#: bucket between two neighbours holds about the same number of rows.
_BOUNDS_SQL = text("""
    SELECT s.histogram_bounds::text::timestamptz[]
    FROM pg_class c
    JOIN pg_namespace ns ON ns.oid = c.relnamespace
    JOIN pg_stats s ON s.schemaname = ns.nspname AND s.tablename = c.relname AND s.attname = 'created_at'
    WHERE c.oid = to_regclass('tasks')
""")
#: The creation hour, the search index's second key where migration 0009 could add it (:func:`_hour`).
_HOUR_STRIDE: ColumnClause[timedelta] = literal_column("'1 hour'::interval")
_HOUR_ORIGIN: ColumnClause[datetime] = literal_column("'2000-01-01 00:00:00+00'::timestamptz")
#: A window covering more hours than this is looked up with its created_at range instead: each hour is
#: one more index scan (~0.1-0.3 ms), and a window that long holds about as many matches either way.
HOUR_KEYS_MAX = 48
#: What each process last read of a database's statistics: (what, database URL) -> (when, value).
_statistics: dict[tuple[str, str], tuple[float, Any]] = {}

_T = TypeVar("_T")
#: The columns of a SELECT a filter is added to (whole tasks, or some of their columns).
_Columns = TypeVarTuple("_Columns")


def _search_text() -> ColumnElement[str]:
    """On PostgreSQL, the searched fields as one text: the expression migration 0007 indexes with pg_trgm.

    Spelled exactly as there (``SEARCH_TEXT_SQL``), constants inline (a bound '' would not match): the
    planner uses an expression index only for the same expression. The fields are joined by the ASCII
    unit separator, so a match spans two fields only if the search text holds that character.
    """
    separator = literal_column("E'\\x1f'", Text)
    empty = literal_column("''", Text)
    return (
        Task.type
        + separator
        + func.coalesce(Task.error, empty, type_=Text)
        + separator
        + cast(Task.parameters, Text)
        + separator
        + func.coalesce(cast(Task.result, Text), empty, type_=Text)
    )


def _statistic(session: Session, what: str, read: Callable[[], _T]) -> _T:
    """``read()``, reused for SAMPLE_MAX_AGE_S per database and process: statistics ANALYZE renews
    (and an index a migration rebuilds) change seldom, and a search page should not read them again."""
    bind = session.get_bind()
    assert isinstance(bind, Engine)  # aios.db binds every session to its engine
    key = (what, str(bind.url))
    now = time.monotonic()
    cached = _statistics.get(key)
    if cached is None or now - cached[0] > SAMPLE_MAX_AGE_S:
        cached = _statistics[key] = (now, read())
    value: _T = cached[1]  # what read() returned under this key
    return value


def search_sample(session: Session) -> tuple[str, ...]:
    """Up to ~100 search texts ANALYZE sampled (lower case), read at most every SAMPLE_MAX_AGE_S per database.

    Empty without statistics: never analysed, no index (pg_trgm missing), or not readable by this role.
    """
    return _statistic(
        session,
        "sample",
        lambda: tuple(value.lower() for value in session.scalar(_SAMPLE_SQL, {"index": SEARCH_INDEX}) or []),
    )


def created_bounds(session: Session) -> tuple[datetime, ...]:
    """The created_at histogram ANALYZE keeps (about 100 quantiles, oldest first), read at most every
    SAMPLE_MAX_AGE_S per database; empty without statistics."""
    return _statistic(session, "bounds", lambda: tuple(session.scalar(_BOUNDS_SQL) or []))


def _hour() -> ColumnElement[datetime]:
    """A task's creation hour (UTC): spelled exactly as migration 0009's ``HOUR_SQL``, constants inline,
    or the planner would not match it to the index."""
    return func.date_bin(_HOUR_STRIDE, Task.created_at, _HOUR_ORIGIN, type_=DateTime(timezone=True))


def search_keyed_by_hour(session: Session) -> bool:
    """Whether the search index also holds each task's creation hour (migration 0009), read at most every
    SAMPLE_MAX_AGE_S per database."""
    keyed: bool = _statistic(
        session,
        "keyed by hour",
        lambda: (
            session.scalar(
                text("SELECT indnkeyatts FROM pg_index WHERE indexrelid = to_regclass(:index)"), {"index": SEARCH_INDEX}
            )
            == 2
        ),
    )
    return keyed


def hour_keys(lo: datetime, hi: datetime) -> list[datetime] | None:
    """The UTC hours (as :func:`_hour` computes them) that ``lo <= created_at < hi`` touches; None if more
    than HOUR_KEYS_MAX."""
    first = lo.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    count = math.floor((hi.astimezone(UTC) - first) / timedelta(hours=1)) + 1
    if count > HOUR_KEYS_MAX:
        return None
    return [first + timedelta(hours=n) for n in range(count)]


def index_words(q: str, sample: Sequence[str], *, whole_text_common: bool = False) -> tuple[str, ...]:
    """The words of ``q`` to look up in the search index instead of the whole text; () for the whole text.

    A trigram GIN lookup costs about (candidate rows) x (trigrams of the pattern), and a trigram of a
    word found in most rows has a posting list about as long as the table: ``customer-4242`` among a
    million ``customer-N`` rows spends ~70 ms in the index on the trigrams of ``customer`` and under
    1 ms on those of ``4242``. So when the whole text is in none of the sampled search texts (rare: the
    newest-first walk would not find it soon either) but some of its words are in most of them, only
    the other words are looked up; the rows found are then checked against the whole text, field by
    field. ``sample``: :func:`search_sample`, lower case. ``whole_text_common``: leave the common
    words out even when the whole text is in the sample (a search window, whose rows a created_at
    range narrows down: there the lookup of a word in most rows would be the whole cost).
    """
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(q)))
    if len(words) < 2 or not sample:
        return ()

    def share(part: str) -> float:
        return sum(part in sampled for sampled in sample) / len(sample)

    if share(q.lower()) > 0 and not whole_text_common:
        return ()
    rare = tuple(word for word in words if share(word) <= COMMON_WORD_SHARE)
    return rare if 0 < len(rare) < len(words) else ()


def _matches(
    q: str, *, dialect: str, index_words: Sequence[str] = (), tasks: Any = Task, indexed: bool = True
) -> ColumnElement[bool]:
    """Tasks whose type, error, parameters or result (as JSON text) hold ``q``, in any case; a command's
    parameters and result are not searched (its argv, env and output may hold secrets: aios.tasks.view).

    ``indexed=False``: field by field only, a condition the search index cannot serve, for a query that
    must read rows in created_at order (the planner might otherwise look the text up in the index);
    ``tasks``: the columns to match, Task's or a subquery's (``.c``) when rows are read that way.

    The JSON columns are matched as their stored text, where a string's " and \\ are escaped (and, on
    SQLite, non-ASCII letters are \\u escapes): there the text is looked for as JSON would spell it.
    """
    plain = _like(q)
    as_json = _like(json.dumps(q, ensure_ascii=dialect == "sqlite")[1:-1])
    in_plain_fields = or_(
        tasks.type.ilike(plain, escape="\\"),
        func.coalesce(tasks.error, "").ilike(plain, escape="\\"),
    )
    per_field = or_(
        in_plain_fields,
        and_(
            tasks.type != COMMAND_TYPE,
            or_(
                cast(tasks.parameters, Text).ilike(as_json, escape="\\"),
                func.coalesce(cast(tasks.result, Text), "").ilike(as_json, escape="\\"),
            ),
        ),
    )
    if dialect != "postgresql" or not indexed:
        return per_field
    search_text = _search_text()
    if index_words:
        # The index finds the rows holding these words; per_field (which no index serves) decides.
        return and_(*(search_text.ilike(f"%{word}%") for word in index_words), per_field)
    # One ILIKE over the indexed expression. It is exact when the text reads the same in every field
    # and cannot span two; otherwise (a " or \ or control character, which JSON escapes) it only
    # narrows the rows through the index, and per_field decides.
    if plain == as_json and _SEPARATOR not in q:
        # A command found through its parameters or result is dropped by the second condition.
        return and_(search_text.ilike(plain, escape="\\"), or_(tasks.type != COMMAND_TYPE, in_plain_fields))
    return and_(or_(search_text.ilike(plain, escape="\\"), search_text.ilike(as_json, escape="\\")), per_field)


def apply_filter(
    statement: Select[*_Columns], where: TaskFilter, *, dialect: str, index_words: Sequence[str] = ()
) -> Select[*_Columns]:
    """Add ``where``'s conditions to a SELECT over tasks (``index_words``: see :func:`index_words`)."""
    if where.states:
        statement = statement.where(Task.state.in_(where.states))
    if where.type:
        statement = statement.where(Task.type == where.type)
    if where.priority is not None:
        statement = statement.where(Task.priority == where.priority)
    if where.created_after:
        statement = statement.where(Task.created_at > where.created_after)
    if where.created_before:
        statement = statement.where(Task.created_at < where.created_before)
    if where.agent:
        statement = statement.where(or_(Task.agent == where.agent, Task.pinned_agent == where.agent))
    if where.schedule:
        statement = statement.where(Task.schedule_id == where.schedule)
    if where.owner:
        statement = statement.where(Task.owner == where.owner)
    if where.queue:
        statement = statement.where(Task.queue == where.queue)
    if where.ids:
        statement = statement.where(Task.id.in_(where.ids))
    if where.q:
        statement = statement.where(_matches(where.q, dialect=dialect, index_words=index_words))
    return statement


def _filtered(session: Session, statement: Select[*_Columns], where: TaskFilter) -> Select[*_Columns]:
    dialect = session.get_bind().dialect.name
    words = index_words(where.q, search_sample(session)) if where.q and dialect == "postgresql" else ()
    return apply_filter(statement, where, dialect=dialect, index_words=words)


def count_tasks(session: Session, where: TaskFilter) -> int:
    statement = _filtered(session, select(func.count()).select_from(Task), where)
    return int(session.scalar(statement) or 0)


# --------------------------------------------------------------------------- sort and cursor


def _key_columns(sort: str) -> list[Any]:
    """The keyset of a sort: its field, then created_at, then id (unique), all in the same direction."""
    name = sort.lstrip("-")
    columns = [getattr(Task, name)] + ([Task.created_at] if name != "created_at" else [])
    return [*columns, Task.id]


def _key_values(task: Task, sort: str) -> list[Any]:
    return [getattr(task, column.key) for column in _key_columns(sort)]


def encode_cursor(task: Task, sort: str = DEFAULT_SORT) -> str:
    """The position just after ``task`` in ``sort`` order, safe in a URL.

    The default sort keeps its original form ``[created_at, id]`` (cursors handed out before sorting
    existed stay valid); any other sort names itself, so a cursor cannot be followed in another order.
    """
    values = [isoformat(v) if isinstance(v, datetime) else v for v in _key_values(task, sort)]
    payload: Any = values if sort == DEFAULT_SORT else {"sort": sort, "key": values}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _decode_key(sort: str, values: Any) -> list[Any]:
    columns = _key_columns(sort)
    if not isinstance(values, list) or len(values) != len(columns):
        raise ValueError("a cursor key has one value per sort column")
    decoded: list[Any] = []
    for column, value in zip(columns, values, strict=True):
        if column.key == "id":
            if not isinstance(value, str) or not storable_text(value):
                raise ValueError("the task id of a cursor is text the ledger can store")
            decoded.append(value)
        elif column.key == "priority":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError("a priority is an integer")
            decoded.append(value)
        else:
            if not isinstance(value, str):
                raise ValueError("a time is an ISO 8601 string")
            decoded.append(parse_iso(value))
    return decoded


def decode_sorted_cursor(cursor: str, sort: str) -> list[Any]:
    """The key values of a cursor this API issued for ``sort``; 422 for any other text."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        payload = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise ValidationFailed("cursor is not one this API returned", field="cursor") from exc
    issued_for = (
        DEFAULT_SORT if isinstance(payload, list) else (payload.get("sort") if isinstance(payload, dict) else None)
    )
    if issued_for in SORTS and issued_for != sort:
        raise ValidationFailed(
            f"cursor was issued for sort={issued_for}, not sort={sort}; "
            "start again without a cursor to change the order",
            field="cursor",
        )
    try:
        if issued_for != sort or (isinstance(payload, dict) and set(payload) != {"sort", "key"}):
            raise ValueError("not a cursor")
        return _decode_key(sort, payload if isinstance(payload, list) else payload["key"])
    except (ValueError, TypeError) as exc:
        raise ValidationFailed("cursor is not one this API returned", field="cursor") from exc


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A default-sort (newest first) cursor as ``(created_at, id)``."""
    created_at, task_id = decode_sorted_cursor(cursor, DEFAULT_SORT)
    return created_at, task_id


def _after(sort: str, values: Sequence[Any]) -> Any:
    """Rows strictly after ``values`` in ``sort`` order: (a, b, c) > (x, y, z), spelled out so every
    database takes it, plus the redundant a >= x that lets an index on the leading column start the
    scan at the cursor (PostgreSQL does not take an OR as an index range: a deep page would otherwise
    walk every newer row again)."""
    descending = sort.startswith("-")
    columns = _key_columns(sort)
    alternatives = []
    for index, column in enumerate(columns):
        equal = [columns[i] == values[i] for i in range(index)]
        beyond = column < values[index] if descending else column > values[index]
        alternatives.append(and_(*equal, beyond))
    start = columns[0] <= values[0] if descending else columns[0] >= values[0]
    return and_(start, or_(*alternatives))


def list_tasks(
    session: Session, where: TaskFilter, *, limit: int, cursor: str | None, sort: str = DEFAULT_SORT
) -> tuple[list[Task], str | None]:
    """One page in ``sort`` order (newest first by default) and the cursor of the next page, if any."""
    if sort not in SORTS:
        raise ValidationFailed(f"sort: must be one of {', '.join(SORTS)} (got {sort!r})", field="sort")
    after = decode_sorted_cursor(cursor, sort) if cursor else None
    if sort == DEFAULT_SORT and _windowed(session, where) and _windows_fit(session, where.q or ""):
        tasks = _search_newest(session, where, limit + 1, after)
        next_cursor = encode_cursor(tasks[limit - 1], sort) if len(tasks) > limit else None
        return tasks[:limit], next_cursor
    statement = _filtered(session, select(Task), where)
    if after:
        statement = statement.where(_after(sort, after))
    columns = _key_columns(sort)
    order = [c.desc() for c in columns] if sort.startswith("-") else [c.asc() for c in columns]
    tasks = list(session.scalars(statement.order_by(*order).limit(limit + 1)))
    next_cursor = encode_cursor(tasks[limit - 1], sort) if len(tasks) > limit else None
    return tasks[:limit], next_cursor


# --------------------------------------------------------------------------- q= newest first, by windows

#: The newest rows (past the cursor) a search page reads one by one before it turns to the index.
#: Reading a row and checking its search text costs ~2-3 us: 1,000 rows hold a page of any text in
#: 5 % or more of them, and cost a few ms when they hold none.
WALK_ROWS = 1000
#: A window's index lookup may use a 3-5 character piece of ``q`` the sample holds at most this many
#: times as often as ``q`` itself (see :func:`_window_words`).
WINDOW_PIECE_SLACK = 1.5
#: When those rows hold the text but not a page of it, up to this many more are read one by one if
#: their share promises the page there (cheaper than an index lookup for a text in ~1 % of the rows).
WALK_MORE_ROWS = 8000
#: At most this many rows of a created_at bucket are read to see whether the bucket holds the text.
PROBE_ROWS_MAX = 200
#: A text in more than this share of the sampled search texts is found by the one query (the planner
#: walks created_at newest first): its posting lists are most of the table, and reading rows finds a
#: page sooner than looking it up.
WALK_SHARE = 0.25
#: Fewest sampled search texts holding ``q`` for it to be searched by windows. One or two are what chance
#: gives a rare text (with 1,000 texts sampled, one in 0.02 % of the rows is in one about a fifth of the
#: time), and for a rare text the index lookup alone is the fast plan: windows cost it ~80 ms instead of
#: ~10 (BENCHMARKS.md, `q=customer-4242` after earlier figures).
WINDOW_MIN_SAMPLE_HITS = 3
#: Buckets probed per page before the rest is looked up in the index whole (the text is rare there).
PROBES_MAX = 40
#: A window reaches back as many buckets as should hold this many pages, at the share a probe saw.
PROBE_MARGIN = 4


def _windowed(session: Session, where: TaskFilter) -> bool:
    """Whether a ``q=`` page is found window by window (:func:`_search_newest`), on PostgreSQL: the
    other conditions must be ones an index ordered by created_at serves (or none), or each probe
    would read far more rows than it looks at."""
    if not where.q or session.get_bind().dialect.name != "postgresql":
        return False
    return not (where.priority is not None or where.agent or where.schedule or where.owner or where.queue or where.ids)


def _search_newest(session: Session, where: TaskFilter, need: int, after: Sequence[Any] | None) -> list[Task]:
    """Up to ``need`` tasks matching ``where`` (with a ``q``), newest first, after the cursor key ``after``.

    The same rows, in the same order, as one ``ORDER BY created_at DESC, id DESC LIMIT need`` query; but
    that query leaves the planner two plans, each slow for some texts: walking created_at newest first
    until the page is full (slow when the newest rows hold none: it reads them all), or the trigram
    index lookup plus a sort (slow for a text in more than ~0.1 % of the rows: it reads every one of
    them). So the page is found in created_at windows, newest first, each window a query of its own:

    1. The newest WALK_ROWS rows (and the rest of the last one's created_at), read one by one: enough
       for a text in about 5 % or more of them.
    2. Then, going back through the created_at buckets of ANALYZE's histogram (each ~1 % of the rows),
       a few rows of each bucket are read until one holds the text; the window from there back over as
       many buckets as should hold PROBE_MARGIN pages is searched through the search index by the
       hours it covers (migration 0009; GIN skips the parts of the text's posting lists outside them)
       and kept to the window's range; without hour keys, the trigram index AND'ed with the created_at
       range (a BitmapAnd), which costs the text's whole posting lists. Either costs the matching rows
       of the window, never the rows in between that hold nothing. Repeated from that window's oldest
       edge until the page is full; once PROBES_MAX buckets were probed, or none below holds the text,
       the rest is looked up in the index whole (the text is rare there).

    :func:`list_tasks` sends a text the sample of search texts (migration 0008) does not hold (rare: the
    index lookup is cheap) or holds in most entries (the walk finds it soon) the one query instead.
    """
    words = index_words(where.q or "", search_sample(session))
    unsearched = replace(where, q=None)
    order = (Task.created_at.desc(), Task.id.desc())

    def filtered(statement: Select[Any]) -> Select[Any]:
        statement = apply_filter(statement, where, dialect="postgresql", index_words=words)
        return statement.where(_after(DEFAULT_SORT, after)) if after else statement

    def newest(
        statement: Select[*_Columns], older_than: datetime | ColumnElement[datetime] | None
    ) -> Select[*_Columns]:
        statement = apply_filter(statement, unsearched, dialect="postgresql")
        if older_than is not None:
            statement = statement.where(Task.created_at < older_than)
        elif after:
            statement = statement.where(_after(DEFAULT_SORT, after))
        return statement.order_by(*order)

    walked = _matches(where.q or "", dialect="postgresql", indexed=False)

    def walk(rows: int, older_than: datetime | None, wanted: int = need) -> tuple[list[Task], datetime | None]:
        """Up to ``wanted`` matches among the next ``rows`` rows and any more of the same created_at as the
        last of them (its edge: the rows older than it are what remains), read one by one newest first
        (the search condition field by field, which no index serves, so the planner walks created_at);
        and that edge, None if ``wanted`` were found or no row is left past them."""
        edge = session.scalar(newest(select(Task.created_at), older_than).offset(rows - 1).limit(1))
        statement = newest(select(Task), older_than).where(walked)
        if edge is not None:
            statement = statement.where(Task.created_at >= edge)
        matches = list(session.scalars(statement.limit(wanted)))
        return matches, None if len(matches) >= wanted else edge

    # 1. The newest rows, one by one; more of them while the share they hold promises a page soon.
    found, edge = walk(WALK_ROWS, None)
    if found and edge is not None and len(found) < need:
        more = math.ceil(2 * (need - len(found)) * WALK_ROWS / len(found))
        if more <= WALK_MORE_ROWS:
            later, edge = walk(more, edge)
            found += later
    if len(found) >= need or edge is None:
        return found[:need]
    bounds = [b for b in reversed(created_bounds(session)) if b < edge]
    sample = search_sample(session)
    share = _sample_share(session, where.q or "")
    if not bounds:  # never analysed: one query, as before windows
        rest = filtered(select(Task)).where(Task.created_at < edge).order_by(*order).limit(need - len(found))
        return found + list(session.scalars(rest))
    by_hour = search_keyed_by_hour(session)

    @functools.cache
    def range_words() -> tuple[str, ...]:
        """What a window without hour keys looks up in the index (an hour-keyed one: the whole text, whose
        long posting lists GIN skips through outside the window's hours)."""
        return (
            _window_words(where.q or "", sample) or index_words(where.q or "", sample, whole_text_common=True) or words
        )

    probe_rows = min(PROBE_ROWS_MAX, max(50, math.ceil(3 / share)))
    probes = 0

    def window_edge(hi: datetime) -> tuple[datetime | None, datetime | None, float]:
        """The oldest created_at of the next window below ``hi`` (None: everything below ``hi``); the
        upper edge of the first bucket whose newest rows hold the text (None: none does) and the share
        of them that do."""
        nonlocal probes
        older = [b for b in bounds if b < hi]
        uppers = [hi, *older][: PROBES_MAX - probes]
        if not older or not uppers:
            return None, None, 0.0
        # One statement probes the buckets newest first and stops at the first holding the text.
        buckets = (
            func.unnest(array(uppers, type_=DateTime(timezone=True)))
            .table_valued("upper", with_ordinality="k")
            .render_derived()
        )
        rows = (
            newest(select(Task.type, Task.error, Task.parameters, Task.result), buckets.c.upper)
            .limit(probe_rows)
            .correlate(buckets)
            .subquery()
        )
        probed_match = _matches(where.q or "", dialect="postgresql", tasks=rows.c, indexed=False)
        hits = select(func.count()).select_from(rows).where(probed_match).scalar_subquery()
        # OFFSET 0 keeps the subquery whole: flattened, the probe would run again for the WHERE.
        probed = select(buckets.c.k, hits.label("hits")).offset(0).subquery()
        first = session.execute(select(probed.c.k, probed.c.hits).where(probed.c.hits > 0).limit(1)).first()
        if first is None:
            probes += len(uppers)
            return None, None, 0.0
        k, hit_rows = int(first.k) - 1, int(first.hits)
        probes += k + 1
        # Enough buckets, from the first that holds the text, for PROBE_MARGIN pages at the share the
        # probe saw (a window of too few costs another index lookup; too many, rows read for nothing).
        per_bucket = hit_rows / probe_rows * _reltuples(session) / max(1, len(created_bounds(session)) - 1)
        last = k + max(1, math.ceil(PROBE_MARGIN * need / max(per_bucket, 1.0))) - 1
        return (older[last] if last < len(older) else None), uppers[k], hit_rows / probe_rows

    def look_up(lo: datetime | None, hi: datetime) -> list[Task]:
        """The matches in ``lo <= created_at < hi`` (no lower bound: None), newest first, as many as the
        page still needs, found through the search index."""
        in_window = [
            Task.created_at < hi,
            *([_after(DEFAULT_SORT, after)] if after else []),
            *([Task.created_at >= lo] if lo is not None else []),
        ]
        keys = hour_keys(lo, hi) if by_hour and lo is not None else None
        window = apply_filter(
            select(Task.id, Task.created_at), where, dialect="postgresql", index_words=() if keys else range_words()
        )
        # MATERIALIZED, without a LIMIT inside: the planner may not walk created_at across the window
        # (the plan this function avoids).
        if keys:
            # The index finds the matches of the window's hours (its second key, migration 0009); the range
            # is applied to those outside the CTE, so the planner cannot AND the lookup with a scan of
            # ix_tasks_created as long as the window, which would cost more than the lookup itself.
            matched = window.where(_hour().in_(keys)).cte("matched").prefix_with("MATERIALIZED")
            chosen = select(matched.c.id).where(*(ClauseAdapter(matched).traverse(c) for c in in_window))
        else:
            # It picks the index lookup AND'ed with the range.
            matched = window.where(*in_window).cte("matched").prefix_with("MATERIALIZED")
            chosen = select(matched.c.id)
        ids = list(
            session.scalars(chosen.order_by(matched.c.created_at.desc(), matched.c.id.desc()).limit(need - len(found)))
        )
        if not ids:
            return []
        rows = {task.id: task for task in session.scalars(select(Task).where(Task.id.in_(ids)))}
        return [rows[task_id] for task_id in ids]

    hi = edge
    while len(found) < need:
        lo, hit_upper, hit_share = window_edge(hi)
        if by_hour and hit_upper is not None and hour_keys(hit_upper, hi) is not None:
            # The buckets between hi and the first that holds the text showed none in their newest rows:
            # their few matches, if any, are looked up by hour; from that bucket on, the share the probe
            # saw promises the page within a short walk, cheaper than reading all a window's matches.
            if hit_upper < hi:
                found += look_up(hit_upper, hi)
            more = math.ceil(2 * (need - len(found)) / hit_share) if len(found) < need else 0
            if more and more <= WALK_ROWS * 2:
                later, hi_next = walk(more, hit_upper, need - len(found))
                found += later
                if hi_next is None:
                    break
                hi = hi_next
                continue
            if len(found) >= need:
                break
            hi = hit_upper
        found += look_up(lo, hi)
        if lo is None:
            break
        hi = lo
    return found


def _window_words(q: str, sample: Sequence[str]) -> tuple[str, ...]:
    """A short piece of a word of ``q`` for a window's index lookup, if the sample holds it hardly more
    often than ``q``; () if none is.

    A trigram GIN lookup decodes the posting list of every trigram of the pattern, each at least as
    long as the text's rows: ``upstream`` (6 trigrams) in 100,000 rows costs about three times
    ``upst`` (2). The window's BitmapAnd keeps only its range of the rows found, and the whole text is
    checked on those, so a piece as selective as the whole text gives the same rows for less.
    """
    if not sample:
        return ()
    lowered = q.lower()

    def share(part: str) -> float:
        return sum(part in sampled for sampled in sample) / len(sample)

    ceiling = WINDOW_PIECE_SLACK * share(lowered) + 1 / len(sample)
    for size in (3, 4, 5):
        pieces = {word[i : i + size] for word in _WORD.findall(lowered) for i in range(len(word) - size + 1)}
        fitting = sorted((share(piece), piece) for piece in pieces if share(piece) <= ceiling)
        if fitting:
            return (fitting[0][1],)
    return ()


def _windows_fit(session: Session, q: str) -> bool:
    """Whether ``q`` is common enough for windows and not so common that the one query walks to it soon:
    in at least WINDOW_MIN_SAMPLE_HITS of the sampled search texts, and at most WALK_SHARE of them."""
    sample = search_sample(session)
    share = _sample_share(session, q)
    return (not sample or share * len(sample) >= WINDOW_MIN_SAMPLE_HITS) and 0 < share <= WALK_SHARE


def _sample_share(session: Session, q: str) -> float:
    """The share of the sampled search texts holding ``q``; 0.01 without a sample (never analysed)."""
    sample = search_sample(session)
    return sum(q.lower() in value for value in sample) / len(sample) if sample else 0.01


def _reltuples(session: Session) -> float:
    """The planner's row count of tasks, read at most every SAMPLE_MAX_AGE_S per database."""
    return _statistic(
        session,
        "rows",
        lambda: float(
            session.scalar(text("SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = to_regclass('tasks')")) or 0.0
        ),
    )
