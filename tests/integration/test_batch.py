"""POST /api/v1/tasks/batch, end to end on PostgreSQL + Redis + real workers.

A batch is stored in one transaction (all tasks or none), published in one go, and every task in
it runs exactly once even with several workers competing for the same queue.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from aios.broker.celery_app import queue_name
from aios.db import session_scope
from aios.models import Task, TaskEvent
from tests.conftest import authorize, wait_for

pytestmark = pytest.mark.integration

BATCH_SIZE = 500


def count_tasks(stack: Any) -> int:
    with session_scope(stack.settings.database) as session:
        return session.scalar(select(func.count()).select_from(Task))


def states_of(stack: Any, task_ids: list[str]) -> dict[str, int]:
    """How many of ``task_ids`` are in each state."""
    with session_scope(stack.settings.database) as session:
        rows = session.execute(select(Task.state, func.count()).where(Task.id.in_(task_ids)).group_by(Task.state)).all()
    return {state: count for state, count in rows}


def running_events_per_task(stack: Any, task_ids: list[str]) -> dict[str, int]:
    """How many times each task was moved to RUNNING (i.e. claimed by a worker)."""
    with session_scope(stack.settings.database) as session:
        rows = session.execute(
            select(TaskEvent.task_id, func.count())
            .where(TaskEvent.task_id.in_(task_ids), TaskEvent.to_state == "RUNNING")
            .group_by(TaskEvent.task_id)
        ).all()
    return {task_id: count for task_id, count in rows}


def test_five_hundred_echo_tasks_submitted_in_one_batch_all_succeed_each_exactly_once(
    client, start_worker, stack, queue
):
    # Given two real workers competing for one queue
    first = start_worker([queue], concurrency=2)
    second = start_worker([queue], concurrency=2)

    # When 500 echo tasks are submitted in one batch request
    items = [{"type": "echo", "parameters": {"n": n}, "queue": queue} for n in range(BATCH_SIZE)]
    response = client.post("/api/v1/tasks/batch", json={"tasks": items})

    # Then the batch is accepted, every task stored and published
    assert response.status_code == 202, response.json
    body = response.json
    assert body["count"] == BATCH_SIZE
    assert body["queued"] == BATCH_SIZE and body["pending"] == 0
    ids = body["ids"]
    assert len(set(ids)) == BATCH_SIZE

    # And all of them reach SUCCEEDED
    def all_succeeded() -> bool:
        return states_of(stack, ids) == {"SUCCEEDED": BATCH_SIZE}

    wait_for(
        all_succeeded,
        timeout=120,
        interval=0.5,
        what=f"{BATCH_SIZE} batch tasks to succeed (states now {states_of(stack, ids)})",
    )

    # And each one was claimed exactly once: one RUNNING event per task, no more, no less
    running = running_events_per_task(stack, ids)
    assert set(running) == set(ids)
    duplicates = {task_id: n for task_id, n in running.items() if n != 1}
    assert duplicates == {}

    # And each result is the task's own parameters
    with session_scope(stack.settings.database) as session:
        results = dict(session.execute(select(Task.id, Task.result).where(Task.id.in_(ids))).all())
    assert [results[task_id] for task_id in ids] == [{"n": n} for n in range(BATCH_SIZE)]

    # And both workers took part
    with session_scope(stack.settings.database) as session:
        agents = set(session.scalars(select(Task.agent).where(Task.id.in_(ids)).distinct()))
    assert agents == {first.hostname, second.hostname}


def test_a_batch_with_one_invalid_item_is_refused_whole_and_names_the_item_field(client, stack, queue):
    # Given a batch whose fourth item has a priority outside 0-9
    items = [{"type": "echo", "parameters": {"n": n}, "queue": queue, "priority": 5} for n in range(6)]
    items[3]["priority"] = 12
    before = count_tasks(stack)

    # When it is submitted
    response = client.post("/api/v1/tasks/batch", json={"tasks": items})

    # Then it is refused with 422, naming the offending item's field
    assert response.status_code == 422, response.json
    assert response.json["error"] == "validation_failed"
    assert response.json["field"] == "tasks.3.priority"
    # And no task of the batch was stored
    assert count_tasks(stack) == before


def test_a_batch_over_the_size_limit_is_refused_and_nothing_is_stored(stack, celery_client, queue, admin):
    # Given an API whose batch limit is 5 tasks
    from webapi.app import create_app

    small = stack.override(api={"batch_max_tasks": 5})
    client = authorize(create_app(small.settings, celery_client).test_client(), admin.key)
    before = count_tasks(stack)

    # When a batch of 6 valid tasks is submitted
    items = [{"type": "echo", "parameters": {"n": n}, "queue": queue} for n in range(6)]
    response = client.post("/api/v1/tasks/batch", json={"tasks": items})

    # Then it is refused with 422 naming the tasks list, and nothing was stored
    assert response.status_code == 422, response.json
    assert response.json["field"] == "tasks"
    assert "at most 5" in response.json["message"]
    assert count_tasks(stack) == before

    # And a batch exactly at the limit is accepted
    response = client.post("/api/v1/tasks/batch", json={"tasks": items[:5]})
    assert response.status_code == 202, response.json
    assert response.json["count"] == 5
    assert count_tasks(stack) == before + 5


def test_messages_published_within_a_batch_equal_what_send_task_publishes(stack, celery_client, queue, monkeypatch):
    """aios.broker.publish publishes the first message of a batch through ``send_task`` and the rest through
    ``_send_in_batch``; what reaches kombu's ``Producer.publish`` must be the same message apart from
    the task's own ids and time (and the retry wrapper, which a batch's buffered publish has no use for)."""
    import uuid

    from kombu import Producer

    from aios.broker.publish import PUBLISHED_AT_HEADER, Dispatch, publish

    published: list[tuple[Any, dict[str, Any]]] = []
    original = Producer.publish

    def recording(self: Any, body: Any, **kwargs: Any) -> Any:
        published.append((body, kwargs))
        return original(self, body, **kwargs)

    monkeypatch.setattr(Producer, "publish", recording)
    dispatches = [
        Dispatch(task_id=str(uuid.uuid4()), dispatch_id=str(uuid.uuid4()), queue=queue, priority=7, timeout_s=120)
        for _ in range(3)
    ]
    assert publish(celery_client, stack.settings, dispatches) == {}
    assert len(published) == 3

    def normalized(index: int) -> tuple[Any, dict[str, Any]]:
        body, kwargs = published[index]
        item = dispatches[index]
        args, task_kwargs, embed = body
        assert task_kwargs == {"dispatch_id": item.dispatch_id}
        headers = dict(kwargs["headers"])
        assert headers.pop("id") == headers.pop("root_id") == kwargs["correlation_id"] == item.task_id
        assert headers.pop("kwargsrepr") == kwargs["kwargsrepr"] == f"{{'dispatch_id': '{item.dispatch_id}'}}"
        headers.pop(PUBLISHED_AT_HEADER)
        rest = {
            key: value
            for key, value in kwargs.items()
            if key not in {"headers", "correlation_id", "kwargsrepr", "retry", "declare"}
        }
        assert [q.name for q in kwargs["declare"]] == [queue_name(stack.settings, queue)]
        return (args, embed), {**rest, "headers": headers}

    by_send_task = normalized(0)
    for index in (1, 2):
        assert normalized(index) == by_send_task
    assert published[1][1]["retry"] is False
