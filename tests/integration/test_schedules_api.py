"""/api/v1/schedules: validation, ownership, and what a schedule shows; firing is in test_beat.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from aios.db import session_scope
from aios.models import Schedule
from aios.timeutil import utcnow
from aios.timing.periodic import fire_due
from tests.conftest import authorize, make_user

pytestmark = pytest.mark.integration


def body(queue: str, **fields):
    return {"name": f"s-{uuid.uuid4().hex[:8]}", "interval_s": 60, "task": {"type": "echo", "queue": queue}, **fields}


def count_schedules(stack) -> int:
    with session_scope(stack.settings.database) as session:
        return session.scalar(select(func.count()).select_from(Schedule)) or 0


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"interval_s": None}, "interval_s"),
        ({"cron": "*/5 * * * *"}, "cron"),
        ({"interval_s": 0}, "interval_s"),
        ({"interval_s": None, "cron": "61 * * * *"}, "cron"),
        ({"task": {"type": "no-such-type"}}, "task.type"),
        ({"task": {"type": "echo", "delay_s": 5}}, "task"),
        ({"task": {"type": "echo", "priority": 12}}, "task.priority"),
        ({"name": "has spaces"}, "name"),
        ({"owner": "someone"}, "owner"),
    ],
)
def test_a_bad_schedule_is_refused_with_422_naming_the_field_and_nothing_is_stored(client, stack, queue, change, field):
    # Given a schedule body with one thing wrong
    data = {k: v for k, v in {**body(queue), **change}.items() if v is not None}
    before = count_schedules(stack)

    # When it is posted
    answer = client.post("/api/v1/schedules", json=data)

    # Then 422 names the field, and nothing was stored
    assert answer.status_code == 422, answer.json
    assert answer.json["error"] in {"validation_failed", "unknown_task_type"}
    assert answer.json["field"].startswith(field), answer.json
    assert count_schedules(stack) == before


def test_a_schedule_shows_its_next_run_and_after_firing_its_last_run_and_task(client, stack, queue, celery_client):
    from aios.timing.beat import spec_for

    # Given a cron schedule
    created = client.post("/api/v1/schedules", json=body(queue, interval_s=None, cron="*/5 * * * *"))
    assert created.status_code == 201, created.json
    shown = client.get(f"/api/v1/schedules/{created.json['id']}").json
    next_run = datetime.fromisoformat(shown["next_run_at"])
    assert next_run > datetime.now(UTC) and next_run.minute % 5 == 0 and next_run.second == 0
    assert shown["last_run_at"] is None

    # When its time comes (fired as the beat leader would, at that moment)
    fired = fire_due(celery_client, stack.settings, spec_for, now=next_run)
    again = fire_due(celery_client, stack.settings, spec_for, now=next_run)

    # Then it fired once for that slot, and shows the slot and the task
    shown = client.get(f"/api/v1/schedules/{created.json['id']}").json
    mine = [task_id for task_id in fired if task_id == shown["last_task_id"]]
    assert len(mine) == 1 and shown["last_task_id"] not in again
    assert datetime.fromisoformat(shown["last_run_at"]) == next_run
    task = client.get(f"/api/v1/tasks/{shown['last_task_id']}").json
    assert task["type"] == "echo" and task["queue"] == queue
    client.patch(f"/api/v1/schedules/{created.json['id']}", json={"enabled": False})


def test_a_duplicate_name_is_a_409(client, queue):
    data = body(queue, enabled=False)
    assert client.post("/api/v1/schedules", json=data).status_code == 201
    answer = client.post("/api/v1/schedules", json=data)
    assert answer.status_code == 409 and answer.json["error"] == "conflict"


def test_an_operator_cannot_change_or_delete_another_operators_schedule(api_app, stack, queue):
    # Given a schedule of one operator
    owner, other = make_user(stack, "operator"), make_user(stack, "operator")
    created = authorize(api_app.test_client(), owner.key).post("/api/v1/schedules", json=body(queue, enabled=False))
    assert created.status_code == 201
    schedule_id = created.json["id"]

    # When another operator tries to change or delete it
    intruder = authorize(api_app.test_client(), other.key)
    patched = intruder.patch(f"/api/v1/schedules/{schedule_id}", json={"enabled": True})
    deleted = intruder.delete(f"/api/v1/schedules/{schedule_id}")

    # Then both are refused, and the schedule is as it was
    assert patched.status_code == 403 and deleted.status_code == 403
    assert intruder.get(f"/api/v1/schedules/{schedule_id}").json["enabled"] is False


def test_a_missing_schedule_is_a_404(client):
    assert client.get(f"/api/v1/schedules/{uuid.uuid4()}").status_code == 404
    assert client.patch(f"/api/v1/schedules/{uuid.uuid4()}", json={"enabled": True}).status_code == 404


def test_a_disabled_schedule_does_not_fire_and_reenabling_counts_from_now(client, stack, queue, celery_client):
    from aios.timing.beat import spec_for

    # Given a schedule every second, disabled
    created = client.post("/api/v1/schedules", json=body(queue, interval_s=1)).json
    client.patch(f"/api/v1/schedules/{created['id']}", json={"enabled": False})

    # When beat looks far past its time, it does not fire
    fire_due(celery_client, stack.settings, spec_for, now=datetime(2100, 1, 1, tzinfo=UTC))
    assert client.get(f"/api/v1/schedules/{created['id']}").json["last_task_id"] is None

    # And re-enabled, its next run counts from now, not from its old slot
    shown = client.patch(f"/api/v1/schedules/{created['id']}", json={"enabled": True}).json
    assert datetime.fromisoformat(shown["next_run_at"]) > utcnow()
    assert client.delete(f"/api/v1/schedules/{created['id']}").status_code == 200
