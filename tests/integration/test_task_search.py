"""Searching, filtering and sorting the task list, bulk cancel and retry, and task history across an API
restart: on PostgreSQL + Redis, with real workers and real API processes.

Each test marks its tasks with a token of its own (in the parameters, or a queue of its own), so tasks of
other tests in the same session never count.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
from sqlalchemy import select

from aios.db import session_scope
from aios.models import AuditEntry, Task
from aios.timeutil import isoformat, utcnow
from tests.conftest import authorize, make_user, wait_for

pytestmark = pytest.mark.integration

TASKS = "/api/v1/tasks"
BULK = "/api/v1/tasks/bulk"


def token() -> str:
    return uuid.uuid4().hex[:12]


def submit(client: Any, **body: Any) -> dict[str, Any]:
    response = client.post(TASKS, json=body)
    assert response.status_code == 202, response.json
    return response.json


def listed(client: Any, **query: Any) -> list[dict[str, Any]]:
    """Every task the list returns for ``query``, following next_cursor to the end."""
    tasks: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        response = client.get(TASKS, query_string={**query, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.json
        tasks += response.json["tasks"]
        cursor = response.json["next_cursor"]
        if cursor is None:
            return tasks
    raise AssertionError("next_cursor never ran out")


def ids_of(tasks: list[dict[str, Any]]) -> list[str]:
    return [task["id"] for task in tasks]


# --------------------------------------------------------------------------- search and filters


def test_search_finds_a_task_by_a_parameter_value_and_by_a_result_value_but_not_by_absent_text(
    client, start_worker, ledger, queue
):
    # Given a task that ran on a worker, whose result holds a value its parameters do not (the text reversed)
    mark = token()
    worker = start_worker([queue])
    since = isoformat(utcnow())
    ran = submit(client, type="test.reverse", parameters={"text": f"fwd-{mark}"}, queue=queue)["id"]
    # and a queued task (a queue no worker consumes) with the token in its parameters
    waiting = submit(client, type="echo", parameters={"label": f"param-{mark}"}, queue=f"{queue}x")["id"]
    ledger.wait_state(ran, "SUCCEEDED", timeout=60)
    assert ledger.task(ran).result == {"reversed": f"{mark[::-1]}-dwf"}

    # When the list is searched
    # Then a parameter value finds the queued task, case-insensitively
    assert ids_of(listed(client, q=f"param-{mark}")) == [waiting]
    assert ids_of(listed(client, q=f"PARAM-{mark.upper()}")) == [waiting]
    # and a value only in the result finds the task that ran
    assert ids_of(listed(client, q=mark[::-1])) == [ran]
    # and the token (in both) finds both, newest first; text no task holds finds none
    assert ids_of(listed(client, q=mark)) == [waiting, ran]
    assert listed(client, q=f"absent-{mark}") == []
    # And the agent filter finds the task by the agent that ran it
    assert ids_of(listed(client, agent=worker.hostname, created_after=since)) == [ran]


def test_percent_and_underscore_in_the_search_text_are_taken_literally(client, queue):
    # Given values with % and _, and decoys that those would match as LIKE wildcards
    mark = token()
    percent = submit(client, type="echo", parameters={"v": f"{mark}50%x"}, queue=queue)["id"]
    underscore = submit(client, type="echo", parameters={"v": f"{mark}a_y"}, queue=queue)["id"]
    submit(client, type="echo", parameters={"v": f"{mark}50--x {mark}aZy"}, queue=queue)
    # and a value with double quotes, a backslash and a non-ASCII letter (escaped in the stored JSON text)
    quoted = submit(client, type="echo", parameters={"v": f'{mark} "hi" C:\\tmp Zürich'}, queue=queue)["id"]
    # When searched for the exact texts / Then only the literal matches come back
    assert ids_of(listed(client, q=f"{mark}50%x")) == [percent]
    assert ids_of(listed(client, q=f"{mark}a_y")) == [underscore]
    assert ids_of(listed(client, q=f'{mark} "hi" C:\\tmp Zürich')) == [quoted]
    assert len(listed(client, q=mark)) == 4


def test_several_states_are_listed_at_once(client, queue):
    # Given a QUEUED, a CANCELLED and a SCHEDULED task with the same token
    mark = token()
    queued = submit(client, type="echo", parameters={"m": mark}, queue=queue)["id"]
    cancelled = submit(client, type="echo", parameters={"m": mark}, queue=queue)["id"]
    assert client.delete(f"{TASKS}/{cancelled}").status_code == 200
    scheduled = submit(client, type="echo", parameters={"m": mark}, queue=queue, delay_s=3600)
    assert scheduled["state"] == "SCHEDULED"
    try:
        # When two of the states are asked for
        both = listed(client, q=mark, state="QUEUED,cancelled")
        # Then exactly the tasks in them come back
        assert sorted(ids_of(both)) == sorted([queued, cancelled])
        assert ids_of(listed(client, q=mark, state="SCHEDULED")) == [scheduled["id"]]
    finally:
        client.delete(f"{TASKS}/{scheduled['id']}")


def test_the_schedule_filter_lists_the_tasks_a_schedule_created(client, stack, celery_client, queue):
    from aios.timing.beat import spec_for
    from aios.timing.periodic import fire_due

    # Given a schedule that has fired twice, and another task on its queue
    created = client.post(
        "/api/v1/schedules", json={"name": f"s-{token()}", "interval_s": 60, "task": {"type": "echo", "queue": queue}}
    )
    assert created.status_code == 201, created.json
    schedule_id = created.json["id"]
    try:
        first_slot = datetime.fromisoformat(client.get(f"/api/v1/schedules/{schedule_id}").json["next_run_at"])
        fired = fire_due(celery_client, stack.settings, spec_for, now=first_slot)
        fired += fire_due(celery_client, stack.settings, spec_for, now=first_slot + timedelta(seconds=60))
        other = submit(client, type="echo", queue=queue)["id"]
        with session_scope(stack.settings.database) as session:
            mine = set(session.scalars(select(Task.id).where(Task.id.in_(fired), Task.schedule_id == schedule_id)))
        assert len(mine) == 2
        # When the list is filtered by the schedule
        found = listed(client, schedule=schedule_id)
        # Then exactly its two tasks
        assert set(ids_of(found)) == mine and other not in ids_of(found)
        assert listed(client, schedule=str(uuid.uuid4())) == []
    finally:
        client.patch(f"/api/v1/schedules/{schedule_id}", json={"enabled": False})


@pytest.mark.parametrize("sort", ["-priority", "priority"])
def test_sorting_by_priority_pages_through_every_task_once_in_order(client, queue, sort):
    # Given 13 tasks with priorities 0-3 (many ties)
    mark = token()
    created = [
        submit(client, type="echo", parameters={"m": mark, "i": i}, priority=i % 4, queue=queue) for i in range(13)
    ]
    # When read 3 at a time in priority order
    seen = listed(client, q=mark, sort=sort, limit=3)
    # Then every task once (no duplicates, no gaps), by priority, ties newest first (or oldest for ascending)
    assert sorted(ids_of(seen)) == sorted(t["id"] for t in created)
    assert len(seen) == 13
    descending = sort.startswith("-")
    keys = [(t["priority"], t["created_at"], t["id"]) for t in seen]
    assert keys == sorted(keys, reverse=descending)
    assert [t["priority"] for t in seen][0] == (3 if descending else 0)


def test_a_cursor_cannot_be_followed_in_another_sort_order(client, queue):
    mark = token()
    for i in range(3):
        submit(client, type="echo", parameters={"m": mark, "i": i}, queue=queue)
    first = client.get(TASKS, query_string={"q": mark, "sort": "-priority", "limit": 1}).json
    assert first["next_cursor"]
    other = client.get(
        TASKS, query_string={"q": mark, "sort": "updated_at", "limit": 1, "cursor": first["next_cursor"]}
    )
    assert other.status_code == 422 and other.json["field"] == "cursor"
    assert "sort=-priority" in other.json["message"]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"sort": "state"}, "sort"),
        ({"sort": "priority,created_at"}, "sort"),
        ({"sort": ""}, "sort"),
        ({"q": "a"}, "q"),
        ({"q": "x" * 201}, "q"),
        ({"agent": ""}, "agent"),
        ({"state": "QUEUED,NOPE"}, "state"),
    ],
)
def test_a_bad_search_or_sort_is_a_422_naming_the_parameter(client, query, field):
    response = client.get(TASKS, query_string=query)
    assert response.status_code == 422, response.json
    assert response.json["field"] == field


# --------------------------------------------------------------------------- bulk


def audit_rows(stack, mark: str) -> list[AuditEntry]:
    with session_scope(stack.settings.database) as session:
        rows = session.scalars(select(AuditEntry).where(AuditEntry.action == "task.bulk").order_by(AuditEntry.id))
        return [row for row in rows if (row.detail or {}).get("filter", {}).get("q") == mark]


def test_a_dry_run_counts_what_the_real_run_then_cancels_and_changes_nothing(client, stack, ledger, queue, admin):
    # Given 5 QUEUED tasks (a queue no worker consumes) and 2 finished ones with the same token
    mark = token()
    queued = [submit(client, type="echo", parameters={"m": mark, "i": i}, queue=queue)["id"] for i in range(5)]
    finished = [submit(client, type="echo", parameters={"m": mark}, queue=queue)["id"] for _ in range(2)]
    for task_id in finished:
        assert client.delete(f"{TASKS}/{task_id}").status_code == 200
    events_before = {task_id: len(ledger.events(task_id)) for task_id in queued}
    request = {"action": "cancel", "filter": {"q": mark}}

    # When a dry run is asked for
    dry = client.post(BULK, json={**request, "dry_run": True})

    # Then it counts the 5 cancellable tasks (not the finished ones) and changes nothing
    assert dry.status_code == 200, dry.json
    assert dry.json["matched"] == 5 and dry.json["dry_run"] is True and dry.json["action"] == "cancel"
    assert sorted(dry.json["sample_ids"]) == sorted(queued)
    assert set(ledger.states(queued).values()) == {"QUEUED"}
    assert {task_id: len(ledger.events(task_id)) for task_id in queued} == events_before

    # When it is run for real
    real = client.post(BULK, json=request)

    # Then the same 5 are cancelled, each with its timeline event
    assert real.status_code == 200, real.json
    assert real.json["matched"] == dry.json["matched"] == real.json["done"] == 5
    assert real.json["skipped"] == {}
    assert set(ledger.states(queued).values()) == {"CANCELLED"}
    for task_id in queued:
        last = ledger.events(task_id)[-1]
        assert (last.from_state, last.to_state) == ("QUEUED", "CANCELLED")
        assert last.actor.startswith(f"api:{admin.user}") and last.detail["bulk"] is True
        assert ledger.task(task_id).finished_at is not None
    # And a second run finds nothing left to cancel
    assert client.post(BULK, json=request).json["matched"] == 0
    # And each request left an audit row with what it did
    rows = audit_rows(stack, mark)
    assert [
        (r.principal, r.outcome, r.detail["operation"], r.detail["dry_run"], r.detail["matched"], r.detail["count"])
        for r in rows
    ] == [
        (admin.user, "success", "cancel", True, 5, 0),
        (admin.user, "success", "cancel", False, 5, 5),
        (admin.user, "success", "cancel", False, 0, 0),
    ]


def test_bulk_retry_of_failed_tasks_creates_new_tasks_pointing_back(client, start_worker, ledger, queue, stack):
    # Given 3 tasks that FAILED on a worker
    start_worker([queue])
    failed = [submit(client, type="test.refuse", queue=queue)["id"] for _ in range(3)]
    for task_id in failed:
        ledger.wait_state(task_id, "FAILED", timeout=60)
    request = {"action": "retry", "filter": {"queue": queue, "state": ["FAILED"]}}
    assert client.post(BULK, json={**request, "dry_run": True}).json["matched"] == 3

    # When they are retried in bulk
    answer = client.post(BULK, json=request)

    # Then 3 new tasks point back at them and run again; the old ones stay FAILED
    assert answer.status_code == 200, answer.json
    assert answer.json["matched"] == answer.json["done"] == 3
    with session_scope(stack.settings.database) as session:
        retries = {
            row.retry_of: row.id
            for row in session.execute(select(Task.id, Task.retry_of).where(Task.retry_of.in_(failed)))
        }
    assert set(retries) == set(failed)
    for new_id in retries.values():
        ledger.wait_state(new_id, "FAILED", timeout=60)
        assert ledger.task(new_id).attempts == 1
    assert set(ledger.states(failed).values()) == {"FAILED"}


def test_an_operator_bulk_touches_only_their_own_tasks(api_app, stack, ledger, queue, client):
    # Given two operators with 3 queued tasks each on the same queue
    olga, bob = make_user(stack, "operator"), make_user(stack, "operator")
    as_olga = authorize(api_app.test_client(), olga.key)
    as_bob = authorize(api_app.test_client(), bob.key)
    olgas = [submit(as_olga, type="echo", queue=queue)["id"] for _ in range(3)]
    bobs = [submit(as_bob, type="echo", queue=queue)["id"] for _ in range(3)]

    # When olga cancels everything on the queue
    answer = as_olga.post(BULK, json={"action": "cancel", "filter": {"queue": queue}})

    # Then only her tasks are cancelled
    assert answer.status_code == 200, answer.json
    assert answer.json["done"] == 3
    assert set(ledger.states(olgas).values()) == {"CANCELLED"}
    assert set(ledger.states(bobs).values()) == {"QUEUED"}
    # And asking for bob's tasks by owner is refused
    refused = as_olga.post(BULK, json={"action": "cancel", "filter": {"queue": queue, "owner": bob.user}})
    assert refused.status_code == 403, refused.json
    assert set(ledger.states(bobs).values()) == {"QUEUED"}
    # While an admin reaches bob's
    assert (
        client.post(BULK, json={"action": "cancel", "filter": {"queue": queue}, "dry_run": True}).json["sample_ids"]
        == bobs
    )
    assert client.post(BULK, json={"action": "cancel", "filter": {"queue": queue}}).json["done"] == 3


def test_a_viewer_may_not_use_bulk_actions(api_app, stack, ledger, client, queue):
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    task_id = submit(client, type="echo", queue=queue)["id"]
    answer = viewer.post(BULK, json={"action": "cancel", "filter": {"ids": [task_id]}})
    assert answer.status_code == 403, answer.json
    assert ledger.states([task_id]) == {task_id: "QUEUED"}
    client.delete(f"{TASKS}/{task_id}")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "cancel", "filter": {}}, "filter"),
        ({"action": "cancel", "filter": {"type": ""}}, "filter.type"),
        ({"action": "cancel"}, "filter"),
        ({"action": "delete", "filter": {"type": "echo"}}, "action"),
        ({"action": "cancel", "filter": {"state": ["SUCCEEDED"]}}, "filter.state"),
        ({"action": "retry", "filter": {"state": ["QUEUED"]}}, "filter.state"),
        ({"action": "cancel", "filter": {"state": ["NOPE"]}}, "filter.state"),
        ({"action": "cancel", "filter": {"q": "a"}}, "filter.q"),
        ({"action": "cancel", "filter": {"created_after": "soon"}}, "filter.created_after"),
        ({"action": "cancel", "filter": {"ids": []}}, "filter.ids"),
        ({"action": "cancel", "filter": {"type": "echo"}, "limit": 10_001}, "limit"),
        ({"action": "cancel", "filter": {"type": "echo"}, "dry_run": "yes"}, "dry_run"),
        ({"action": "cancel", "filter": {"colour": "blue"}}, "filter.colour"),
    ],
)
def test_a_bad_bulk_request_is_a_422_naming_the_field(client, body, field):
    answer = client.post(BULK, json=body)
    assert answer.status_code == 422, answer.json
    assert answer.json["field"] == field


def test_a_filter_selecting_more_than_the_limit_is_refused_whole(client, ledger, queue):
    # Given 4 queued tasks
    mark = token()
    created = [submit(client, type="echo", parameters={"m": mark}, queue=queue)["id"] for _ in range(4)]
    # When a bulk cancel of them says limit 3
    answer = client.post(BULK, json={"action": "cancel", "filter": {"q": mark}, "limit": 3})
    # Then 409 with the count, and none was cancelled
    assert answer.status_code == 409, answer.json
    assert "4 tasks" in answer.json["message"] and "narrow" in answer.json["message"]
    assert set(ledger.states(created).values()) == {"QUEUED"}
    # While limit 4 does them all
    assert client.post(BULK, json={"action": "cancel", "filter": {"q": mark}, "limit": 4}).json["done"] == 4


# --------------------------------------------------------------------------- restart


def test_task_history_is_still_listed_after_the_api_restarts(start_api, admin, queue):
    # Given an API process that accepted 7 tasks
    mark = token()
    headers = {"X-API-Key": admin.key}
    first = start_api(name="before")
    submitted = []
    for i in range(7):
        response = requests.post(
            f"{first.url}{TASKS}",
            json={"type": "echo", "parameters": {"m": mark, "i": i}, "queue": queue},
            headers=headers,
            timeout=30,
        )
        assert response.status_code == 202, response.text
        submitted.append(response.json()["id"])

    # When it stops and a new API process starts on the same database
    first.stop()
    assert first.process.poll() is not None
    second = start_api(name="after")

    # Then paging through the new one's list (3 at a time) shows every task once, newest first
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        response = requests.get(
            f"{second.url}{TASKS}",
            params={"q": mark, "limit": 3, **({"cursor": cursor} if cursor else {})},
            headers=headers,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        seen += [task["id"] for task in response.json()["tasks"]]
        cursor = response.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(submitted))
    wait_for(
        lambda: (
            requests.get(f"{second.url}{TASKS}/{submitted[0]}", headers=headers, timeout=30).json()["state"] == "QUEUED"
        ),
        timeout=10,
        what="the first task to read back as QUEUED",
    )
