"""The pure parts of the event streams: the gap-aware watermark, cursors, filters and SSE framing."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from aios.errors import ValidationFailed
from aios.tasks.events import Cursor, FeedFilter, Watermark, parse_event_id, task_event_kind
from aios.tasks.progress import check_progress
from aios.tasktypes import TaskContext
from aios.timeutil import utcnow
from webapi.events import frame


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watermark_moves_over_contiguous_ids():
    mark = Watermark(10)
    now = utcnow()
    assert mark.advance([(11, now), (12, now), (13, now)], now) == 13


def test_the_watermark_waits_at_a_fresh_gap_until_it_fills():
    # Given ids 11 and 13 visible, 12 not yet committed
    clock = Clock()
    mark = Watermark(10, clock=clock, wait_s=5)
    now = utcnow()
    assert mark.advance([(11, now), (13, now)], now) == 11
    clock.now = 1
    assert mark.advance([(13, now)], now) == 11
    # When 12 commits, everything moves on, in order
    clock.now = 2
    assert mark.advance([(12, now), (13, now)], now) == 13


def test_the_watermark_gives_up_on_a_gap_after_the_wait():
    clock = Clock()
    mark = Watermark(10, clock=clock, wait_s=5)
    now = utcnow()
    assert mark.advance([(13, now)], now) == 10
    clock.now = 4.9
    assert mark.advance([(13, now)], now) == 10
    clock.now = 5.1
    assert mark.advance([(13, now)], now) == 13


def test_the_watermark_does_not_wait_at_a_gap_behind_an_old_row():
    # A gap followed by a row written long ago is a rolled-back or deleted row, not one in flight
    mark = Watermark(10, clock=Clock(), wait_s=5)
    now = utcnow()
    assert mark.advance([(20, now - timedelta(seconds=60)), (21, now)], now) == 21


def test_a_partly_filled_gap_keeps_its_first_sighting():
    clock = Clock()
    mark = Watermark(10, clock=clock, wait_s=5)
    now = utcnow()
    assert mark.advance([(14, now)], now) == 10  # 11..13 missing, first seen at 0
    clock.now = 3
    assert mark.advance([(11, now), (14, now)], now) == 11  # 12..13 still missing: same gap
    clock.now = 5.5
    assert mark.advance([(14, now)], now) == 14


def test_cursors_and_event_ids_round_trip_and_refuse_garbage():
    assert Cursor.parse(Cursor(12, 3).encode(), field="after") == Cursor(12, 3)
    assert Cursor.parse(None, field="after") is None
    assert parse_event_id("42", field="after") == 42
    assert parse_event_id("", field="after") is None
    for bad in ("12", "1:2:3", "a:1", "-1:2", "1: 2"):
        with pytest.raises(ValidationFailed):
            Cursor.parse(bad, field="after")
    for bad in ("-1", "1.5", "x", "٣", "9" * 20):
        with pytest.raises(ValidationFailed):
            parse_event_id(bad, field="after")


def test_filters_parse_comma_lists_and_name_unknown_values():
    where = FeedFilter.parse(types="task", state="RUNNING,DRAINING", type="echo, sleep", agent="a@h")
    assert where.sources == {"task"} and where.states == {"RUNNING", "DRAINING"}
    assert where.types == {"echo", "sleep"} and where.agents == {"a@h"}
    assert FeedFilter.parse().sources == {"task", "agent"}
    with pytest.raises(ValidationFailed, match="jobs"):
        FeedFilter.parse(types="jobs")
    with pytest.raises(ValidationFailed, match="SLEEPING"):
        FeedFilter.parse(state="SLEEPING")


def test_event_kinds_and_frames():
    assert task_event_kind("RUNNING", None) == "state"
    assert task_event_kind(None, {"progress": 10.0, "message": None}) == "progress"
    assert task_event_kind(None, {"note": "delivery skipped"}) == "note"
    text = frame("progress", {"message": "two\nlines"}, "7")
    assert text.endswith("\n\n") and text.count("\n") == 4
    lines = text.splitlines()
    assert lines[:2] == ["id: 7", "event: progress"]
    assert json.loads(lines[2].removeprefix("data: ")) == {"message": "two\nlines"}


def test_progress_values_are_checked_and_a_context_without_a_run_keeps_the_last_report():
    assert check_progress(50) == (50.0, None)
    assert check_progress(0.5, "x" * 600)[1] == "x" * 500
    for bad in (-0.1, 101, float("inf"), None, True, "10"):
        with pytest.raises(ValidationFailed):
            check_progress(bad)
    with pytest.raises(ValidationFailed):
        check_progress(10, 5)
    ctx = TaskContext(task_id="t", attempt=1, agent="a@h")
    assert ctx.progress(30, "copying") is True
    assert ctx.last_progress == (30.0, "copying")
    assert ctx.flush_progress() is True
