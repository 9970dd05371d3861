"""Priorities on Redis: 9 runs first, 0 last, and first come first served within one level.

One worker with concurrency 1 is kept busy by a sleeping task while the rest are submitted. With
acks_late and a prefetch of 1 the busy worker holds only its running message, so every other
message waits in Redis, and the order the worker then takes them in is the broker's order.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from sqlalchemy import select

from aios.db import session_scope
from aios.models import Task, TaskEvent
from tests.conftest import wait_for

pytestmark = pytest.mark.integration

PER_LEVEL = 3
BLOCKER_SECONDS = 4.0


def claim_order(stack: Any, task_ids: list[str]) -> list[str]:
    """Task ids in the order workers claimed them (the id order of their RUNNING events)."""
    with session_scope(stack.settings.database) as session:
        return list(
            session.scalars(
                select(TaskEvent.task_id)
                .where(TaskEvent.task_id.in_(task_ids), TaskEvent.to_state == "RUNNING")
                .order_by(TaskEvent.id)
            )
        )


def test_waiting_tasks_start_in_priority_order_nine_first_and_in_submit_order_within_a_priority(
    client, start_worker, ledger, stack, queue
):
    # Given one worker with a single pool process, busy with a sleeping task
    start_worker([queue], concurrency=1)
    blocker = client.post(
        "/api/v1/tasks",
        json={
            "type": "sleep",
            "parameters": {"seconds": BLOCKER_SECONDS},
            "queue": queue,
            "priority": 0,
        },
    )
    assert blocker.status_code == 202, blocker.json
    ledger.wait_state(blocker.json["id"], "RUNNING", timeout=30)

    # When 30 echo tasks of priorities 0-9 (three per level) are submitted in shuffled order
    priorities = [level for level in range(10) for _ in range(PER_LEVEL)]
    random.Random(20240611).shuffle(priorities)
    submitted: list[tuple[str, int]] = []  # (task id, priority) in submit order
    for index, priority in enumerate(priorities):
        response = client.post(
            "/api/v1/tasks",
            json={
                "type": "echo",
                "parameters": {"index": index},
                "queue": queue,
                "priority": priority,
            },
        )
        assert response.status_code == 202, response.json
        assert response.json["state"] == "QUEUED"
        submitted.append((response.json["id"], priority))
    # (the test only means something if all of them were waiting while the worker was busy)
    assert ledger.task(blocker.json["id"]).state == "RUNNING", "blocker finished before all tasks were submitted"

    # Then all of them succeed
    ids = [task_id for task_id, _ in submitted]
    wait_for(
        lambda: set(ledger.states(ids).values()) == {"SUCCEEDED"},
        timeout=60,
        interval=0.2,
        what="the 30 prioritised tasks to succeed",
    )
    assert ledger.task(blocker.json["id"]).state == "SUCCEEDED"

    # And they started highest priority first, and in submit order within one priority
    started = claim_order(stack, ids)
    assert len(started) == len(ids)
    expected = [task_id for task_id, _ in sorted(submitted, key=lambda item: (-item[1], ids.index(item[0])))]
    priority_of = dict(submitted)
    assert [priority_of[t] for t in started] == [priority_of[t] for t in expected], "not in priority order"
    assert started == expected, "not first-in-first-out within a priority"

    # And the started_at timestamps agree with the claim order
    stamps = [ledger.task(task_id).started_at for task_id in started]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize("priority", [10, -1, 12])
def test_a_priority_outside_zero_to_nine_is_refused_at_submit_naming_the_priority_field(client, stack, queue, priority):
    # Given a task with a priority outside 0-9
    body = {"type": "echo", "parameters": {}, "queue": queue, "priority": priority}

    # When it is submitted
    response = client.post("/api/v1/tasks", json=body)

    # Then it is refused with 422 naming the priority field, and nothing is stored in its queue
    assert response.status_code == 422, response.json
    assert response.json["error"] == "validation_failed"
    assert response.json["field"] == "priority"
    with session_scope(stack.settings.database) as session:
        assert session.scalars(select(Task.id).where(Task.queue == queue)).all() == []
