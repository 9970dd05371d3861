"""Cancelling tasks over HTTP, on PostgreSQL + Redis + real workers.

A queued task is cancelled in the ledger, so the worker that later receives its message skips it at
claim time (even a worker that was not running when the cancel was sent); a running task is also
revoked with terminate, which kills its pool process and leaves the worker serving.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.integration


def pool_children(pid: int) -> set[int]:
    """Pids of the direct children of ``pid`` (the prefork pool processes of a worker)."""
    children: set[int] = set()
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            children.update(int(child) for child in (thread / "children").read_text().split())
        except FileNotFoundError:  # the thread ended while we looked
            continue
    return children


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has stopped running


def notes(ledger: Any, task_id: str) -> list[str]:
    return [str((e.detail or {}).get("note")) for e in ledger.events(task_id) if e.to_state is None]


def test_a_cancelled_queued_task_never_runs_even_on_a_worker_started_after_the_cancel(
    client, start_worker, ledger, queue, tmp_path
):
    # Given a test.touch task QUEUED on a queue no worker consumes yet
    marker = tmp_path / "runs.txt"
    submitted = client.post(
        "/api/v1/tasks", json={"type": "test.touch", "parameters": {"path": str(marker)}, "queue": queue}
    )
    assert submitted.status_code == 202, submitted.json
    task_id = submitted.json["id"]
    assert submitted.json["state"] == "QUEUED"

    # When it is cancelled
    cancelled = client.delete(f"/api/v1/tasks/{task_id}")

    # Then the answer is 200 with the task CANCELLED
    assert cancelled.status_code == 200, cancelled.json
    assert cancelled.json["id"] == task_id
    assert cancelled.json["state"] == "CANCELLED"
    assert cancelled.json["finished_at"] is not None

    # And when a worker then starts on that queue, it receives the message and skips it
    start_worker([queue])
    wait_for(
        lambda: "delivery skipped: cancelled" in notes(ledger, task_id),
        timeout=30,
        what="the worker to skip the cancelled task",
    )
    time.sleep(1)  # (would a run still start, it would have by now)
    assert not marker.exists()
    task = ledger.task(task_id)
    assert task.state == "CANCELLED"
    assert task.attempts == 0
    assert task.started_at is None
    assert [e.to_state for e in ledger.events(task_id) if e.to_state] == ["PENDING", "QUEUED", "CANCELLED"]


def test_a_running_task_is_cancelled_and_stopped_within_five_seconds_and_the_worker_keeps_serving(
    client, start_worker, ledger, queue
):
    # Given a worker with a single pool process running a 60 s sleep
    worker = start_worker([queue], concurrency=1)
    submitted = client.post("/api/v1/tasks", json={"type": "sleep", "parameters": {"seconds": 60}, "queue": queue})
    assert submitted.status_code == 202, submitted.json
    task_id = submitted.json["id"]
    ledger.wait_state(task_id, "RUNNING", timeout=30)
    (child,) = pool_children(worker.process.pid)
    assert alive(child)

    # When it is cancelled
    started = time.monotonic()
    cancelled = client.delete(f"/api/v1/tasks/{task_id}")

    # Then the answer is 200 with the task CANCELLED
    assert cancelled.status_code == 200, cancelled.json
    assert cancelled.json["state"] == "CANCELLED"
    # and the pool process running the sleep is gone within 5 s
    wait_for(lambda: not alive(child), timeout=5, interval=0.05, what="the pool process of the sleep to end")
    stopped_after = time.monotonic() - started
    assert stopped_after < 5, stopped_after

    # And the worker is still alive and runs the next task (on its one, replaced, pool process)
    echo = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {"after": "cancel"}, "queue": queue})
    assert echo.status_code == 202, echo.json
    done = ledger.wait_state(echo.json["id"], "SUCCEEDED", timeout=30)
    assert done.result == {"after": "cancel"}
    assert worker.process.poll() is None
    # and the cancelled task stayed CANCELLED: the killed run left no later report behind
    task = ledger.task(task_id)
    assert task.state == "CANCELLED"
    assert [e.to_state for e in ledger.events(task_id) if e.to_state] == ["PENDING", "QUEUED", "RUNNING", "CANCELLED"]
    assert "Terminating" in worker.log()


def test_cancelling_a_finished_task_is_a_conflict_in_the_json_error_shape(client, start_worker, ledger, queue):
    # Given a task that has SUCCEEDED
    start_worker([queue])
    submitted = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {}, "queue": queue})
    assert submitted.status_code == 202, submitted.json
    task_id = submitted.json["id"]
    ledger.wait_state(task_id, "SUCCEEDED")

    # When it is cancelled
    response = client.delete(f"/api/v1/tasks/{task_id}")

    # Then the answer is 409 in the JSON error shape, and the task is unchanged
    assert response.status_code == 409, response.json
    assert response.is_json
    assert response.json["error"] == "conflict"
    assert "SUCCEEDED" in response.json["message"]
    assert response.json["state"] == "SUCCEEDED"
    assert ledger.task(task_id).state == "SUCCEEDED"


def test_cancelling_an_unknown_task_is_not_found(client):
    # Given no task with this id
    # When it is cancelled
    response = client.delete("/api/v1/tasks/00000000-0000-0000-0000-000000000000")
    # Then the answer is 404 in the JSON error shape
    assert response.status_code == 404, response.json
    assert response.is_json
    assert response.json["error"] == "not_found"
    assert "00000000-0000-0000-0000-000000000000" in response.json["message"]
