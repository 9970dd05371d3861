"""Retries, dead tasks, timeouts and manual retry, on PostgreSQL + Redis + real workers.

The test stack uses short backoffs (base 0.2 s, max 1 s), so a few retries take about a second.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select

from aios.db import session_scope
from aios.models import Task

pytestmark = pytest.mark.integration


def transitions(ledger: Any, task_id: str) -> list[str]:
    """The states a task entered, in order (notes left out)."""
    return [e.to_state for e in ledger.events(task_id) if e.to_state]


def submit(client: Any, body: dict[str, Any]) -> str:
    response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 202, response.json
    return response.json["id"]


def test_a_flaky_task_that_fails_twice_succeeds_on_its_third_attempt(client, start_worker, ledger, queue):
    # Given a worker, and a task that fails on its first two attempts and may be retried three times
    start_worker([queue])
    task_id = submit(client, {"type": "test.flaky", "parameters": {"fail_times": 2}, "max_retries": 3, "queue": queue})

    # When it runs
    task = ledger.wait_state(task_id, "SUCCEEDED", "DEAD", "FAILED", timeout=60)

    # Then it ends SUCCEEDED on attempt 3, after two retries (each one back through QUEUED)
    assert task.state == "SUCCEEDED"
    assert task.attempts == 3
    assert task.result == {"attempt": 3}
    assert task.error is None
    assert transitions(ledger, task_id) == [
        "PENDING",
        "QUEUED",
        "RUNNING",
        "RETRYING",
        "QUEUED",
        "RUNNING",
        "RETRYING",
        "QUEUED",
        "RUNNING",
        "SUCCEEDED",
    ]
    retry_errors = [e.detail["error"] for e in ledger.events(task_id) if e.to_state == "RETRYING"]
    assert retry_errors == ["RuntimeError: planned failure on attempt 1", "RuntimeError: planned failure on attempt 2"]


def test_a_task_that_always_fails_ends_dead_after_its_retries_are_used_up(client, start_worker, ledger, queue):
    # Given a worker, and a task that always fails and may be retried twice
    start_worker([queue])
    task_id = submit(client, {"type": "test.always_fail", "max_retries": 2, "queue": queue})

    # When it runs
    task = ledger.wait_state(task_id, "DEAD", "SUCCEEDED", "FAILED", timeout=60)

    # Then it ends DEAD after three attempts (the first run plus two retries), with the last error
    assert task.state == "DEAD"
    assert task.attempts == 3
    assert task.error == "RuntimeError: always fails (attempt 3)"
    assert task.finished_at is not None
    assert transitions(ledger, task_id).count("RETRYING") == 2
    assert transitions(ledger, task_id)[-2:] == ["RUNNING", "DEAD"]


def test_a_task_running_past_its_timeout_ends_timed_out_and_the_worker_keeps_working(
    client, start_worker, ledger, queue
):
    # Given a worker with a single pool process, and a 30 s sleep allowed to run 2 s
    worker = start_worker([queue], concurrency=1)
    started = time.monotonic()
    task_id = submit(client, {"type": "sleep", "parameters": {"seconds": 30}, "timeout_s": 2, "queue": queue})

    # When it runs
    task = ledger.wait_state(task_id, "TIMED_OUT", "SUCCEEDED", "FAILED", "DEAD", timeout=15)
    elapsed = time.monotonic() - started

    # Then it ends TIMED_OUT well before the sleep would have finished
    assert task.state == "TIMED_OUT"
    assert elapsed < 10, elapsed
    assert "timed out" in task.error
    assert task.attempts == 1
    assert transitions(ledger, task_id) == ["PENDING", "QUEUED", "RUNNING", "TIMED_OUT"]

    # And the worker, still alive, runs the next task on its one pool process
    echo_id = submit(client, {"type": "echo", "parameters": {"after": "timeout"}, "queue": queue})
    assert ledger.wait_state(echo_id, "SUCCEEDED", timeout=30).result == {"after": "timeout"}
    assert worker.process.poll() is None
    assert ledger.task(task_id).state == "TIMED_OUT"


def test_retrying_a_dead_task_creates_a_new_task_linked_to_it_and_leaves_the_old_one_dead(
    client, start_worker, ledger, queue
):
    # Given a DEAD task
    start_worker([queue])
    old_id = submit(client, {"type": "test.always_fail", "max_retries": 0, "queue": queue})
    ledger.wait_state(old_id, "DEAD", timeout=30)

    # When it is retried
    response = client.post(f"/api/v1/tasks/{old_id}/retry")

    # Then the answer is 202 with a NEW task that points back to the old one
    assert response.status_code == 202, response.json
    new = response.json
    assert new["id"] != old_id
    assert new["retry_of"] == old_id
    assert new["type"] == "test.always_fail"
    assert new["queue"] == queue
    assert new["max_retries"] == 0
    assert response.headers["Location"].endswith(new["id"])
    assert new["state"] in ("QUEUED", "RUNNING", "DEAD")
    # and the new task runs (and, failing again, dies on its own), while the old one stays DEAD
    ledger.wait_state(new["id"], "DEAD", timeout=30)
    assert ledger.task(new["id"]).retry_of == old_id
    old = ledger.task(old_id)
    assert old.state == "DEAD"
    assert old.attempts == 1
    assert transitions(ledger, old_id) == ["PENDING", "QUEUED", "RUNNING", "DEAD"]
    first_event = ledger.events(new["id"])[0]
    assert first_event.to_state == "PENDING"
    assert first_event.detail["retry_of"] == old_id


def test_retrying_a_succeeded_task_is_a_conflict(client, start_worker, ledger, stack, queue):
    # Given a SUCCEEDED task
    start_worker([queue])
    task_id = submit(client, {"type": "echo", "parameters": {}, "queue": queue})
    ledger.wait_state(task_id, "SUCCEEDED")

    # When it is retried
    response = client.post(f"/api/v1/tasks/{task_id}/retry")

    # Then the answer is 409 in the JSON error shape, and no new task was made
    assert response.status_code == 409, response.json
    assert response.json["error"] == "conflict"
    assert response.json["state"] == "SUCCEEDED"
    with session_scope(stack.settings.database) as session:
        assert session.scalars(select(Task.id).where(Task.retry_of == task_id)).all() == []
    assert ledger.task(task_id).state == "SUCCEEDED"
