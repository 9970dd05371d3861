"""Cron expressions for periodic schedules: parsing and the next matching minute (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from aios.errors import ValidationFailed
from aios.timing.cron import next_cron_time, parse_cron


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("* * * * *", "2026-01-01T10:00:30", "2026-01-01T10:01:00"),
        ("*/15 * * * *", "2026-01-01T10:14:59", "2026-01-01T10:15:00"),
        ("*/15 * * * *", "2026-01-01T10:15:00", "2026-01-01T10:30:00"),
        ("0 3 * * *", "2026-01-01T03:00:00", "2026-01-02T03:00:00"),
        ("0 3 * * *", "2026-01-01T02:59:00", "2026-01-01T03:00:00"),
        ("30 23 31 12 *", "2026-06-01T00:00:00", "2026-12-31T23:30:00"),
        # day of week: 0 = Sunday; 2026-01-04 is a Sunday
        ("0 0 * * 0", "2026-01-01T00:00:00", "2026-01-04T00:00:00"),
        # both day fields restricted: either matches (1st of the month, or a Sunday)
        ("0 0 1 * 0", "2026-01-01T00:00:00", "2026-01-04T00:00:00"),
        ("0 12 29 2 *", "2026-03-01T00:00:00", "2028-02-29T12:00:00"),
    ],
)
def test_next_cron_time_is_the_first_matching_minute_strictly_after(expression, after, expected):
    assert next_cron_time(expression, at(after)) == at(expected)


@pytest.mark.parametrize("expression", ["* * * *", "61 * * * *", "* 25 * * *", "a b c d e", "* * * * * *"])
def test_a_bad_cron_expression_is_a_validation_error_naming_cron(expression):
    with pytest.raises(ValidationFailed) as caught:
        parse_cron(expression)
    assert caught.value.extra["field"] == "cron"


def test_an_expression_that_never_fires_is_refused():
    with pytest.raises(ValidationFailed):
        next_cron_time("0 0 31 2 *", at("2026-01-01T00:00:00"))
