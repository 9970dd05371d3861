"""Retry backoff (exponential, capped, jittered) and the list endpoint's opaque cursor."""

from __future__ import annotations

import base64
import random
from datetime import UTC, datetime

import pytest

from aios.config import Settings
from aios.errors import ValidationFailed
from aios.models import Task
from aios.tasks.retries import backoff_s
from aios.tasks.search import decode_cursor, encode_cursor


class TopOfRange(random.Random):
    """A fake random source that always picks the top of the jitter range: shows the ceiling itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


def settings_with(base: float = 1.0, cap: float = 600.0) -> Settings:
    return Settings.model_validate({"orchestrator": {"retry_backoff_base_s": base, "retry_backoff_max_s": cap}})


def test_the_backoff_ceiling_doubles_with_every_attempt_until_the_cap():
    # Given base 1 s and cap 600 s
    settings = settings_with()
    # When the ceiling of each attempt is taken
    ceilings = [backoff_s(settings, attempt, rng=TopOfRange()) for attempt in range(1, 13)]
    # Then it doubles from 1 s and stops at 600 s
    assert ceilings == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]


@pytest.mark.parametrize("seed", range(20))
def test_the_backoff_is_jittered_within_half_to_all_of_its_ceiling(seed):
    # Given a seeded random source
    settings = settings_with()
    rng = random.Random(seed)
    for attempt in range(1, 15):
        ceiling = min(600.0, 2.0 ** (attempt - 1))
        # When the delay of each attempt is drawn
        delay = backoff_s(settings, attempt, rng=rng)
        # Then it lies in [ceiling/2, ceiling]
        assert ceiling / 2 <= delay <= ceiling


def test_the_backoff_grows_from_one_attempt_to_the_next_despite_the_jitter():
    # Given a seeded random source (jitter keeps each delay above half its ceiling)
    settings = settings_with()
    rng = random.Random(1234)
    # When delays are drawn for attempts 1..10 (all below the cap)
    delays = [backoff_s(settings, attempt, rng=rng) for attempt in range(1, 11)]
    # Then each is at least the one before, and the last is hundreds of times the first
    assert delays == sorted(delays)
    assert delays[-1] > 100 * delays[0]


def test_the_backoff_never_exceeds_the_cap_even_for_the_largest_attempt():
    # Given the largest possible attempt (max_retries is at most 100)
    settings = settings_with(base=1.0, cap=30.0)
    rng = random.Random(7)
    # When delays are drawn / Then none exceeds the cap
    assert all(15.0 <= backoff_s(settings, attempt, rng=rng) <= 30.0 for attempt in range(6, 102))


def test_the_jitter_really_varies():
    # Given one attempt drawn many times from a seeded source
    settings = settings_with()
    rng = random.Random(99)
    delays = {backoff_s(settings, 8, rng=rng) for _ in range(50)}
    # Then the delays differ (no thundering herd of identical retries)
    assert len(delays) > 40


def test_the_same_seed_gives_the_same_delays():
    settings = settings_with()
    first = [backoff_s(settings, a, rng=random.Random(5)) for a in range(1, 8)]
    second = [backoff_s(settings, a, rng=random.Random(5)) for a in range(1, 8)]
    assert first == second


# --------------------------------------------------------------------------- cursor


def test_a_cursor_round_trips_to_the_same_position():
    # Given a task row (not stored; the cursor only reads its key)
    created = datetime(2024, 5, 17, 12, 30, 45, 123456, tzinfo=UTC)
    task = Task(id="3f1c2b9e-0000-4000-8000-000000000001", created_at=created)
    # When its cursor is encoded and decoded
    cursor = encode_cursor(task)
    decoded = decode_cursor(cursor)
    # Then the same (created_at, id) comes back, to the microsecond, timezone-aware
    assert decoded == (created, task.id)
    assert decoded[0].tzinfo is not None


def test_a_cursor_is_safe_in_a_url():
    # Given a cursor / Then it needs no escaping in a query string
    task = Task(id="3f1c2b9e-0000-4000-8000-000000000001", created_at=datetime(2024, 1, 1, tzinfo=UTC))
    cursor = encode_cursor(task)
    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "!!!",
        "é",
        "",
        _b64("not json"),
        _b64("{}"),
        _b64("[1, 2]"),
        _b64('["2024-01-01T00:00:00Z"]'),
        _b64('["yesterday", "abc"]'),
        _b64('[null, "abc"]'),
        _b64('[["2024"], "abc"]'),
        _b64('["2024-01-01T00:00:00Z", "a", "b"]'),
        _b64('["2024-01-01T00:00:00Z", 5]'),
        _b64('["2024-01-01T00:00:00Z", "a\\u0000b"]'),
    ],
    ids=lambda c: repr(c)[:24],
)
def test_a_garbage_cursor_is_a_validation_error_naming_the_cursor(cursor):
    # Given a cursor this API never issued / When decoded / Then ValidationFailed (422) names "cursor"
    with pytest.raises(ValidationFailed) as caught:
        decode_cursor(cursor)
    assert caught.value.status == 422
    assert caught.value.extra["field"] == "cursor"
