"""A run retries a claim or an outcome the database could not take, for a bounded time only."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from workers import runner


def unreachable() -> OperationalError:
    return OperationalError("SELECT 1", {}, Exception("connection refused"))


def test_a_write_that_fails_while_the_database_is_down_is_run_again_until_it_succeeds():
    calls = []

    def write() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise unreachable()
        return "written"

    assert runner.with_db_retry(write, "testing") == "written"
    assert len(calls) == 3


def test_a_database_that_stays_down_past_the_window_raises_the_last_error(monkeypatch):
    monkeypatch.setattr(runner, "DB_RETRY_WINDOW_S", 1.0)
    calls = []

    def write() -> None:
        calls.append(1)
        raise unreachable()

    with pytest.raises(OperationalError):
        runner.with_db_retry(write, "testing")
    assert 1 <= len(calls) <= 3


def test_an_error_that_is_not_about_reaching_the_database_is_not_retried():
    calls = []

    def write() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        runner.with_db_retry(write, "testing")
    assert calls == [1]
