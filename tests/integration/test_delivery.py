"""Delivery guarantees on PostgreSQL + Redis + real workers.

* At-least-once delivery is made safe by the dispatch fence: a message delivered twice runs once.
* Only JSON is accepted: a pickled message is refused by the worker and never unpickled, let alone run.
* An Idempotency-Key makes a repeated (or concurrent) submit return the first task.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from aios.broker.celery_app import RUN_TASK_NAME, queue_name
from aios.db import session_scope
from aios.models import Task
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.states import TaskState, transition
from tests.conftest import authorize, make_user, wait_for

pytestmark = pytest.mark.integration


# --------------------------------------------------------------------------- helpers


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def running_events(ledger: Any, task_id: str) -> list[Any]:
    return [e for e in ledger.events(task_id) if e.to_state == "RUNNING"]


def count_tasks_with_key(stack: Any, key: str) -> int:
    with session_scope(stack.settings.database) as session:
        return session.scalar(select(func.count()).select_from(Task).where(Task.idempotency_key == key))


def skip_notes(ledger: Any, task_id: str) -> list[Any]:
    return [
        e
        for e in ledger.events(task_id)
        if e.to_state is None and str((e.detail or {}).get("note", "")).startswith("delivery skipped")
    ]


def publish_by_hand(celery_client: Any, stack: Any, task_id: str, dispatch_id: str, queue: str, **options: Any) -> None:
    """Publish an ``aios.run`` message the way :func:`aios.broker.publish.publish` does, but by hand."""
    celery_client.send_task(
        RUN_TASK_NAME,
        kwargs={"dispatch_id": dispatch_id, **options.pop("extra_kwargs", {})},
        task_id=task_id,
        queue=queue_name(stack.settings, queue),
        **options,
    )


def submit_touch(client: Any, queue: str, path: Path) -> str:
    response = client.post(
        "/api/v1/tasks",
        json={"type": "test.touch", "parameters": {"path": str(path)}, "queue": queue, "max_retries": 0},
    )
    assert response.status_code == 202, response.json
    return response.json["id"]


class Canary:
    """Unpickling this creates a directory: proof of whether a pickled body was ever loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


# --------------------------------------------------------------------------- duplicate delivery


def test_a_task_delivered_again_after_it_succeeded_is_skipped_and_runs_only_once(
    client, start_worker, ledger, stack, celery_client, queue, tmp_path
):
    # Given a test.touch task that ran to SUCCEEDED on a worker
    start_worker([queue])
    marker = tmp_path / "runs.txt"
    task_id = submit_touch(client, queue, marker)
    ledger.wait_state(task_id, "SUCCEEDED")
    dispatch_id = ledger.task(task_id).dispatch_id
    assert dispatch_id

    # When the very same message (same task id, same dispatch id, same queue) is published again by hand
    publish_by_hand(celery_client, stack, task_id, dispatch_id, queue)

    # Then the worker receives it, skips it with a note, and the task did not run a second time
    notes = wait_for(lambda: skip_notes(ledger, task_id), timeout=30, what="a 'delivery skipped' note")
    assert notes[0].detail["note"] == "delivery skipped: duplicate delivery"
    assert notes[0].detail["dispatch_id"] == dispatch_id
    assert len(lines(marker)) == 1
    assert len(running_events(ledger, task_id)) == 1
    task = ledger.task(task_id)
    assert task.state == "SUCCEEDED"
    assert task.attempts == 1


def test_a_task_published_twice_while_still_queued_runs_only_once(
    client, start_worker, ledger, stack, celery_client, queue, tmp_path
):
    # Given a test.touch task queued with no worker on its queue, and its message published a second time
    marker = tmp_path / "runs.txt"
    task_id = submit_touch(client, queue, marker)
    task = ledger.task(task_id)
    assert task.state == "QUEUED"
    publish_by_hand(celery_client, stack, task_id, task.dispatch_id, queue)

    # When a worker with two pool processes (so both copies can be taken at once) starts on the queue
    start_worker([queue], concurrency=2)

    # Then exactly one copy runs and the other is skipped as a duplicate
    ledger.wait_state(task_id, "SUCCEEDED")
    notes = wait_for(lambda: skip_notes(ledger, task_id), timeout=30, what="a 'delivery skipped' note")
    assert len(notes) == 1
    assert notes[0].detail["note"] == "delivery skipped: duplicate delivery"
    assert len(lines(marker)) == 1
    assert len(running_events(ledger, task_id)) == 1
    assert ledger.task(task_id).attempts == 1


# --------------------------------------------------------------------------- serialization


def test_the_celery_app_accepts_and_produces_json_only(celery_client):
    # Given the Celery app built from the AIOS settings
    conf = celery_client.conf
    # Then JSON is the only content accepted for tasks and results, and every serializer is JSON
    assert list(conf.accept_content) == ["json"] == list(conf.result_accept_content)
    assert conf.task_serializer == conf.result_serializer == conf.event_serializer == "json"


def test_a_pickle_serialized_message_pushed_into_the_queue_by_hand_is_rejected_and_never_executed(
    start_worker, ledger, stack, celery_client, queue, tmp_path
):
    # Given a QUEUED test.touch task with a known dispatch id and no message in the broker at all
    # (created straight in the ledger, so no JSON copy exists that could run instead)
    marker = tmp_path / "runs.txt"
    dispatch_id = str(uuid.uuid4())
    spec = TaskSpec(
        type="test.touch", parameters={"path": str(marker)}, priority=5, max_retries=0, timeout_s=60, queue=queue
    )
    (task_id,) = create_tasks(None, stack.settings, [spec], actor="test", publish=False).ids
    with session_scope(stack.settings.database) as session:
        assert transition(
            session, task_id, TaskState.PENDING, TaskState.QUEUED, actor="test", values={"dispatch_id": dispatch_id}
        )

    # When a pickle-serialized aios.run message for it is pushed into its queue by hand, carrying
    # an object whose unpickling would leave a canary directory behind
    canary = tmp_path / "canary"
    publish_by_hand(
        celery_client, stack, task_id, dispatch_id, queue, serializer="pickle", extra_kwargs={"canary": Canary(canary)}
    )
    # and a worker starts on that queue
    worker = start_worker([queue])

    # Then the worker refuses the content and discards the message
    wait_for(lambda: "ContentDisallowed" in worker.log(), timeout=30, what="the worker to refuse the pickle message")
    log = worker.log()
    assert "Refusing to deserialize untrusted content of type pickle" in log
    # and nothing was unpickled or run: no canary, no touch line, no claim
    time.sleep(3)
    assert not canary.exists()
    assert not marker.exists()
    task = ledger.task(task_id)
    assert task.state == "QUEUED"
    assert task.attempts == 0
    assert running_events(ledger, task_id) == []
    assert worker.process.poll() is None

    # And (control) the same message as JSON on the same worker runs the task exactly once
    publish_by_hand(celery_client, stack, task_id, dispatch_id, queue)
    ledger.wait_state(task_id, "SUCCEEDED")
    assert len(lines(marker)) == 1
    assert not canary.exists()


# --------------------------------------------------------------------------- idempotency


def test_submitting_twice_with_the_same_idempotency_key_returns_the_first_task(client, stack, queue):
    # Given a task submitted with an Idempotency-Key
    key = f"key-{uuid.uuid4()}"
    body = {"type": "echo", "parameters": {"n": 1}, "queue": queue}
    first = client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.json
    assert "Idempotent-Replayed" not in first.headers

    # When the same request is sent again with the same key
    second = client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})

    # Then the answer is the first task, marked as a replay, and no second task exists
    assert second.status_code == 202, second.json
    assert second.json["id"] == first.json["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"].endswith(first.json["id"])
    assert count_tasks_with_key(stack, key) == 1


def test_ten_concurrent_submits_with_one_idempotency_key_create_one_task(api_app, admin, ledger, stack, queue):
    # Given ten clients ready to submit the same request with the same Idempotency-Key at once
    key = f"key-{uuid.uuid4()}"
    body = {"type": "echo", "parameters": {"n": 10}, "queue": queue}
    clients = 10
    barrier = threading.Barrier(clients)

    def submit(_: int) -> tuple[int, str, bool]:
        own_client = authorize(api_app.test_client(), admin.key)
        barrier.wait(timeout=30)
        response = own_client.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})
        return response.status_code, response.json.get("id"), response.headers.get("Idempotent-Replayed") == "true"

    # When they all submit concurrently
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(submit, range(clients)))

    # Then every one is accepted with the same task id, exactly one created it, and one row exists
    assert [status for status, _, _ in results] == [202] * clients, results
    assert len({task_id for _, task_id, _ in results}) == 1, results
    assert sum(1 for _, _, replayed in results if not replayed) == 1, results
    assert count_tasks_with_key(stack, key) == 1
    assert ledger.task(results[0][1]).state == "QUEUED"


def test_a_second_user_sending_the_same_idempotency_key_gets_a_task_of_their_own(api_app, stack, queue):
    # Given two operators, and a task the first submitted with an Idempotency-Key
    alice = authorize(api_app.test_client(), make_user(stack, "operator").key)
    bob_user = make_user(stack, "operator")
    bob = authorize(api_app.test_client(), bob_user.key)
    key = f"key-{uuid.uuid4()}"
    body = {"type": "echo", "parameters": {"n": 1}, "queue": queue}
    first = alice.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 202, first.json

    # When the second sends the same request with the same key
    second = bob.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})

    # Then the second gets a new task of their own, not a replay of the first's
    assert second.status_code == 202, second.json
    assert "Idempotent-Replayed" not in second.headers
    assert second.json["id"] != first.json["id"]
    assert second.json["owner"] == bob_user.user
    assert count_tasks_with_key(stack, key) == 2
    # and each one's repeat replays their own task, which they may cancel
    again = bob.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key})
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json["id"] == second.json["id"]
    assert alice.post("/api/v1/tasks", json=body, headers={"Idempotency-Key": key}).json["id"] == first.json["id"]
    assert bob.delete(f"/api/v1/tasks/{second.json['id']}").status_code == 200
    # and a different request under the same key is still a conflict for its own user
    changed = bob.post("/api/v1/tasks", json={**body, "parameters": {"n": 2}}, headers={"Idempotency-Key": key})
    assert changed.status_code == 409, changed.json
    assert changed.json["task_id"] == second.json["id"]


def test_the_same_idempotency_key_with_a_different_body_is_a_conflict(client, stack, queue):
    # Given a task submitted with an Idempotency-Key
    key = f"key-{uuid.uuid4()}"
    first = client.post(
        "/api/v1/tasks", json={"type": "echo", "parameters": {"n": 1}, "queue": queue}, headers={"Idempotency-Key": key}
    )
    assert first.status_code == 202, first.json

    # When the key is reused for a different request
    second = client.post(
        "/api/v1/tasks", json={"type": "echo", "parameters": {"n": 2}, "queue": queue}, headers={"Idempotency-Key": key}
    )

    # Then it is refused with 409 in the JSON error shape, naming the task that holds the key
    assert second.status_code == 409, second.json
    assert second.json["error"] == "conflict"
    assert "Idempotency-Key" in second.json["message"]
    assert second.json["task_id"] == first.json["id"]
    assert count_tasks_with_key(stack, key) == 1
