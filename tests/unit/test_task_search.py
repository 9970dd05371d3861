"""Task search, sort and keyset cursors (aios.tasks.search) and bulk selection (aios.tasks.bulk), on SQLite.

The same queries run on PostgreSQL in tests/integration/test_task_search.py.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from aios.db import session_scope
from aios.errors import Forbidden, ValidationFailed
from aios.models import Task
from aios.tasks.bulk import selection
from aios.tasks.search import SORTS, TaskFilter, encode_cursor, list_tasks

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
_ids = itertools.count(1)


def add(
    db, *, parameters=None, result=None, error=None, priority=5, state="QUEUED", at=None, type="echo", **columns
) -> str:
    task_id = f"00000000-0000-4000-8000-{next(_ids):012d}"
    with session_scope(db) as session:
        session.add(
            Task(
                id=task_id,
                type=type,
                parameters=parameters or {},
                priority=priority,
                queue="q",
                state=state,
                result=result,
                error=error,
                attempts=0,
                max_retries=0,
                timeout_s=60,
                created_at=at or T0,
                updated_at=at or T0,
                **columns,
            )
        )
    return task_id


def ids(db, where: TaskFilter, **kwargs) -> list[str]:
    with session_scope(db) as session:
        tasks, _ = list_tasks(session, where, limit=100, cursor=None, **kwargs)
        return [task.id for task in tasks]


def test_search_matches_a_parameter_value_a_result_value_the_error_and_the_type_case_insensitively(db):
    # Given tasks with the word in different places
    in_params = add(db, parameters={"city": "Reykjavik"})
    in_result = add(db, result={"found": "REYKJAVIK harbour"})
    in_error = add(db, error="cannot reach reykjavik")
    in_type = add(db, type="reykjavik.weather")
    add(db, parameters={"city": "Oslo"}, result={"ok": True}, error="timeout")
    # When searched / Then exactly those four come back
    assert set(ids(db, TaskFilter(q="reykJAVIK"))) == {in_params, in_result, in_error, in_type}
    assert ids(db, TaskFilter(q="Helsinki")) == []


def test_percent_underscore_backslash_and_quotes_in_the_search_text_are_literal(db):
    # Given values holding LIKE wildcards, a backslash and a double quote
    percent = add(db, parameters={"v": "50%off"})
    underscore = add(db, parameters={"v": "a_b"})
    backslash = add(db, parameters={"v": "C:\\temp"})
    quoted = add(db, parameters={"v": 'say "hi"'})
    add(db, parameters={"v": "50 off axb C:temp say hi"})
    # Then each is found by its own text only
    assert ids(db, TaskFilter(q="50%off")) == [percent]
    assert ids(db, TaskFilter(q="a_b")) == [underscore]
    assert ids(db, TaskFilter(q="C:\\temp")) == [backslash]
    assert ids(db, TaskFilter(q='"hi"')) == [quoted]


def test_agent_matches_the_agent_that_ran_it_or_the_one_it_is_pinned_to(db):
    ran = add(db, agent="gpu-01@host")
    pinned = add(db, pinned_agent="gpu-01@host")
    add(db, agent="gpu-02@host")
    assert set(ids(db, TaskFilter(agent="gpu-01@host"))) == {ran, pinned}


@pytest.mark.parametrize("sort", SORTS)
def test_paging_through_every_sort_visits_each_task_once_in_order(db, sort):
    # Given 23 tasks with few distinct priorities and timestamps (many ties)
    created = [add(db, priority=i % 3, at=T0 + timedelta(seconds=i % 4)) for i in range(23)]
    with session_scope(db) as session:
        expected = [
            t.id
            for t in sorted(
                session.query(Task).filter(Task.id.in_(created)).all(),
                key=lambda t: (getattr(t, sort.lstrip("-")), t.created_at, t.id),
                reverse=sort.startswith("-"),
            )
        ]
    # When paged 4 at a time
    seen: list[str] = []
    cursor = None
    with session_scope(db) as session:
        for _ in range(20):
            page, cursor = list_tasks(session, TaskFilter(ids=tuple(created)), limit=4, cursor=cursor, sort=sort)
            seen += [t.id for t in page]
            if cursor is None:
                break
    # Then every task once, in the sort's order
    assert seen == expected


def test_a_cursor_of_one_sort_is_refused_by_another(db):
    task = Task(id="00000000-0000-4000-8000-999999999999", created_at=T0, updated_at=T0, priority=3)
    with session_scope(db) as session:
        with pytest.raises(ValidationFailed) as caught:
            list_tasks(session, TaskFilter(), limit=1, cursor=encode_cursor(task, "priority"), sort="-priority")
        assert caught.value.extra["field"] == "cursor"
        assert "sort=priority" in caught.value.message
        with pytest.raises(ValidationFailed):
            list_tasks(session, TaskFilter(), limit=1, cursor=encode_cursor(task), sort="updated_at")
        # while the default sort's cursor keeps its original form and works
        list_tasks(session, TaskFilter(), limit=1, cursor=encode_cursor(task), sort="-created_at")


def test_an_unknown_sort_is_a_422_naming_sort(db):
    with session_scope(db) as session, pytest.raises(ValidationFailed) as caught:
        list_tasks(session, TaskFilter(), limit=1, cursor=None, sort="state")
    assert caught.value.extra["field"] == "sort"


def test_a_bulk_selection_needs_a_condition_and_only_actionable_states():
    with pytest.raises(ValidationFailed) as empty:
        selection(TaskFilter(), "cancel", only_owner=None)
    assert empty.value.extra["field"] == "filter"
    with pytest.raises(ValidationFailed) as wrong:
        selection(TaskFilter(states=("QUEUED", "SUCCEEDED")), "cancel", only_owner=None)
    assert wrong.value.extra["field"] == "filter.state"
    assert "SUCCEEDED" in wrong.value.message


def test_a_bulk_selection_is_narrowed_to_the_actionable_states_and_an_operators_own_tasks():
    chosen = selection(TaskFilter(type="echo"), "retry", only_owner="olga")
    assert set(chosen.states) == {"FAILED", "DEAD", "CANCELLED", "TIMED_OUT"}
    assert chosen.owner == "olga"
    assert selection(TaskFilter(type="echo"), "cancel", only_owner=None).owner is None
    with pytest.raises(Forbidden):
        selection(TaskFilter(owner="bob"), "cancel", only_owner="olga")
