"""Scheduled tasks: reading ``run_at``/``delay_s``, and how a task is stored for them.

Parsing is pure; the storing tests run on a real (temporary) SQLite database built by the migrations.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from aios.config import Settings
from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import Task, TaskEvent
from aios.tasks.create import create_tasks
from aios.tasks.spec import MAX_AHEAD_S, TaskSpec, hold_until, parse_run_at, requested_run_at

NOW = datetime(2030, 1, 31, 12, 0, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- parse_run_at


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-31T12:00:05Z", datetime(2030, 1, 31, 12, 0, 5, tzinfo=UTC)),
        ("2030-01-31T12:00:05+00:00", datetime(2030, 1, 31, 12, 0, 5, tzinfo=UTC)),
        ("2030-01-31T14:00:05+02:00", datetime(2030, 1, 31, 12, 0, 5, tzinfo=UTC)),
        ("2030-01-31T07:30:05.250-04:30", datetime(2030, 1, 31, 12, 0, 5, 250_000, tzinfo=UTC)),
        ("2030-01-31 12:00:05Z", datetime(2030, 1, 31, 12, 0, 5, tzinfo=UTC)),
    ],
)
def test_a_time_with_a_zone_is_read_and_converted_to_utc(text, expected):
    # Given an ISO 8601 time naming its zone / When it is parsed
    parsed = parse_run_at(text)
    # Then it is the same instant, in UTC
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["2030-01-31T12:00:05", "2030-01-31", "2030-01-31 12:00"])
def test_a_time_without_a_zone_is_refused_with_a_message_that_says_how_to_fix_it(text):
    # Given a naive time / When it is parsed / Then it is a 422 that asks for Z or an offset
    with pytest.raises(ValidationFailed) as raised:
        parse_run_at(text)
    assert "no time zone" in raised.value.message
    assert "Z" in raised.value.message
    assert raised.value.extra["field"] == "run_at"


@pytest.mark.parametrize("text", ["", "tomorrow", "2030-13-01T00:00:00Z", "1700000000", "2030-01-31T25:00Z", "x" * 65])
def test_text_that_is_not_an_iso_time_is_refused(text):
    with pytest.raises(ValidationFailed) as raised:
        parse_run_at(text, field="tasks.3.run_at")
    assert raised.value.extra["field"] == "tasks.3.run_at"


def test_a_time_with_no_utc_equivalent_is_refused_not_a_crash():
    with pytest.raises(ValidationFailed, match="outside the range"):
        parse_run_at("0001-01-01T00:00:00+01:00")


# --------------------------------------------------------------------------- requested_run_at


def test_run_at_and_delay_s_together_are_refused():
    with pytest.raises(ValidationFailed, match="not both") as raised:
        requested_run_at("2030-01-31T12:00:05Z", 5, now=NOW, field_prefix="tasks.0")
    assert raised.value.extra["field"] == "tasks.0.delay_s"


def test_neither_means_no_time():
    assert requested_run_at(None, None, now=NOW) is None


def test_a_delay_is_checked_but_left_for_the_store_to_count_from_its_own_clock():
    # Given a delay within bounds / Then there is no absolute run_at yet (create_tasks computes it)
    assert requested_run_at(None, 3, now=NOW) is None
    assert requested_run_at(None, 0, now=NOW) is None
    assert requested_run_at(None, MAX_AHEAD_S, now=NOW) is None


@pytest.mark.parametrize("delay", [-0.001, MAX_AHEAD_S + 1, float("inf"), float("nan")])
def test_a_delay_out_of_bounds_is_refused(delay):
    with pytest.raises(ValidationFailed, match="between 0 and") as raised:
        requested_run_at(None, delay, now=NOW)
    assert raised.value.extra["field"] == "delay_s"


def test_a_past_run_at_is_accepted_and_a_run_at_beyond_366_days_is_refused():
    assert requested_run_at("2000-01-01T00:00:00Z", None, now=NOW) == datetime(2000, 1, 1, tzinfo=UTC)
    limit = NOW + timedelta(seconds=MAX_AHEAD_S)
    assert requested_run_at(limit.isoformat(), None, now=NOW) == limit
    with pytest.raises(ValidationFailed, match="366 days"):
        requested_run_at((limit + timedelta(seconds=1)).isoformat(), None, now=NOW)


# --------------------------------------------------------------------------- hold_until


def test_a_future_time_is_held_and_a_time_now_or_past_runs_at_once():
    assert hold_until(NOW + timedelta(seconds=1), None, now=NOW) == NOW + timedelta(seconds=1)
    assert hold_until(NOW, None, now=NOW) is None
    assert hold_until(NOW - timedelta(days=1), None, now=NOW) is None
    assert hold_until(None, None, now=NOW) is None


def test_a_delay_counts_from_the_moment_of_storing():
    assert hold_until(None, 3, now=NOW) == NOW + timedelta(seconds=3)
    assert hold_until(None, 0.25, now=NOW) == NOW + timedelta(seconds=0.25)
    assert hold_until(None, 0, now=NOW) is None


def test_a_naive_run_at_from_a_library_caller_is_taken_as_utc():
    assert hold_until(datetime(2030, 1, 31, 12, 0, 1), None, now=NOW) == NOW + timedelta(seconds=1)


# --------------------------------------------------------------------------- create_tasks


def spec(**timing: object) -> TaskSpec:
    return TaskSpec(type="echo", parameters={}, priority=5, max_retries=0, timeout_s=60, queue="default", **timing)  # type: ignore[arg-type]


def test_create_tasks_stores_future_tasks_scheduled_and_others_pending_each_with_its_first_event(db):
    # Given a batch mixing a delay, a future time, a past time and no time
    future = datetime.now(UTC) + timedelta(hours=1)
    specs = [spec(delay_s=30), spec(run_at=future), spec(run_at=datetime(2000, 1, 1, tzinfo=UTC)), spec()]
    # When they are stored
    ids = create_tasks(None, Settings(database=db), specs, actor="test", publish=False).ids
    # Then the future ones are SCHEDULED with their run_at, the others PENDING without one
    with session_scope(db) as session:
        rows = {t.id: t for t in session.scalars(select(Task).where(Task.id.in_(ids)))}
        events = {e.task_id: e for e in session.scalars(select(TaskEvent).where(TaskEvent.task_id.in_(ids)))}
        delayed, timed, past, plain = (rows[i] for i in ids)
        assert (delayed.state, timed.state, past.state, plain.state) == ("SCHEDULED", "SCHEDULED", "PENDING", "PENDING")
        # delay_s counts from created_at exactly
        assert delayed.run_at - delayed.created_at == timedelta(seconds=30)
        assert timed.run_at == future
        assert past.run_at is None and plain.run_at is None
        # And each has one creation event naming the state it was created in (and the run_at)
        assert [events[i].to_state for i in ids] == ["SCHEDULED", "SCHEDULED", "PENDING", "PENDING"]
        assert events[ids[0]].from_state is None
        assert events[ids[1]].detail["run_at"] == future.isoformat().replace("+00:00", "Z")
        assert "run_at" not in events[ids[3]].detail
