"""Every bad request gets its status and one JSON error shape, and leaves the ledger untouched.

Runs the real Flask app against the real PostgreSQL and Redis. Also: the health probes, and keyset
pagination of the task list.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from aios.db import session_scope
from aios.models import Task, TaskEvent
from aios.tasks.create import create_tasks
from aios.tasks.spec import TaskSpec
from aios.tasks.states import TaskState, transition
from aios.timeutil import isoformat, utcnow

pytestmark = pytest.mark.integration

TASKS = "/api/v1/tasks"
MULTIPART_BODY = '--x\r\nContent-Disposition: form-data; name="type"\r\n\r\necho\r\n--x--\r\n'


# --------------------------------------------------------------------------- helpers


def row_counts(stack: Any) -> tuple[int, int]:
    """(tasks, task_events) rows in the whole ledger."""
    with session_scope(stack.settings.database) as session:
        return (
            session.scalar(select(func.count()).select_from(Task)),
            session.scalar(select(func.count()).select_from(TaskEvent)),
        )


@pytest.fixture()
def unchanged(stack: Any) -> Iterator[None]:
    """Fails the test if it added or removed any task or event row."""
    before = row_counts(stack)
    yield
    assert row_counts(stack) == before, "a refused request changed the ledger"


def assert_error(response: Any, status: int, code: str | None = None, field: str | None = None) -> dict[str, Any]:
    """The response has ``status`` and the JSON error shape (never an HTML page)."""
    body_text = response.get_data(as_text=True)
    assert response.status_code == status, body_text
    assert response.mimetype == "application/json", response.headers
    assert "<html" not in body_text.lower()
    body = json.loads(body_text)
    assert isinstance(body.get("error"), str) and body["error"]
    assert isinstance(body.get("message"), str) and body["message"]
    if code is not None:
        assert body["error"] == code, body
    if field is not None:
        assert body.get("field") == field, body
    return body


def finished_task(stack: Any, queue: str, final: TaskState = TaskState.SUCCEEDED) -> str:
    """A task that already ran to ``final``, written straight into the ledger through the state machine."""
    spec = TaskSpec(type="echo", parameters={"x": 1}, priority=5, max_retries=0, timeout_s=60, queue=queue)
    (task_id,) = create_tasks(None, stack.settings, [spec], actor="test", publish=False).ids
    steps = [(TaskState.PENDING, TaskState.QUEUED), (TaskState.QUEUED, TaskState.RUNNING), (TaskState.RUNNING, final)]
    for current, target in steps:
        with session_scope(stack.settings.database) as session:
            assert transition(session, task_id, current, target, actor="test")
    return task_id


# --------------------------------------------------------------------------- 400, 413, 415


@pytest.mark.parametrize(
    "data",
    [b'{"type": "echo", ', b"{'type': 'echo'}", b"", b"\xff\xfe\x00garbage", b'{"type": "echo"} trailing'],
    ids=["truncated", "single-quotes", "empty", "not-utf8", "trailing-garbage"],
)
def test_malformed_json_is_a_400(client, unchanged, data):
    # Given a body that claims to be JSON but does not parse
    # When it is posted
    response = client.post(TASKS, data=data, content_type="application/json")
    # Then 400 bad_request in the JSON error shape
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "data",
    [
        '{"type": "echo", "parameters": {"x": NaN}}',
        '{"type": "echo", "parameters": {"x": -Infinity}}',
        '{"type": "echo", "parameters": {"x": 1e400}}',
        '{"type": "echo", "parameters": {"x": ' + "9" * 5000 + "}}",
        '{"type": "echo", "priority": ' + "9" * 5000 + "}",
        '{"type": "echo", "parameters": {"x": ' + "[" * 5000 + "]" * 5000 + "}}",
    ],
    ids=["NaN", "Infinity", "float-overflow", "5000-digit-int", "5000-digit-priority", "nested-5000-deep"],
)
def test_json_that_python_would_bend_or_choke_on_is_a_400(client, unchanged, data):
    # Given a body that is not standard JSON (NaN, Infinity), a number no JSON column can hold, or
    # nesting past the parser's stack
    # When it is posted
    response = client.post(TASKS, data=data, content_type="application/json")
    # Then 400 bad_request: never a 500, and never a task stored with the value silently turned into null
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "echo", "parameters": {"x": "a\u0000b"}}, "parameters.x"),
        ({"type": "echo", "parameters": {"list": ["ok", "\u0000"]}}, "parameters.list.1"),
        ({"type": "echo", "parameters": {"k\u0000": 1}}, "parameters"),
        ({"type": "echo", "parameters": {"x": "\ud800"}}, "parameters.x"),
        ({"tasks": [{"type": "echo"}, {"type": "echo", "parameters": {"x": "\u0000"}}]}, "tasks.1.parameters.x"),
    ],
    ids=["nul-in-value", "nul-in-list", "nul-in-key", "lone-surrogate", "nul-in-batch"],
)
def test_text_the_database_cannot_store_is_a_422_naming_where_it_is(client, unchanged, body, field):
    # Given JSON text with a NUL character or a lone surrogate (PostgreSQL cannot store either)
    url = f"{TASKS}/batch" if "tasks" in body else TASKS
    # When it is posted
    response = client.post(url, data=json.dumps(body), content_type="application/json")
    # Then 422 naming where it is, not a 500 from the database driver
    assert_error(response, 422, "validation_failed", field=field)


def test_parameters_nested_deeper_than_the_limit_are_a_422(client, unchanged):
    # Given parameters nested 300 levels deep (parses fine, but past what the API will store)
    data = '{"type": "echo", "parameters": {"x": ' + "[" * 300 + "]" * 300 + "}}"
    # When posted / Then 422 on a path inside parameters, not a 500 from the serializer
    body = assert_error(client.post(TASKS, data=data, content_type="application/json"), 422, "validation_failed")
    assert body["field"].startswith("parameters.x.0.0")


def test_parameters_nested_moderately_are_stored_and_returned_intact(client, queue):
    # Given parameters nested 50 levels deep
    deep: object = "bottom"
    for _ in range(50):
        deep = [deep]
    # When posted and read back / Then they are stored unchanged
    response = client.post(TASKS, json={"type": "echo", "parameters": {"x": deep}, "queue": queue})
    assert response.status_code == 202, response.get_data(as_text=True)[:300]
    assert client.get(f"{TASKS}/{response.json['id']}").json["parameters"] == {"x": deep}


@pytest.mark.parametrize(
    ("content_type", "data"),
    [
        ("text/plain", '{"type": "echo"}'),
        ("application/x-www-form-urlencoded", "type=echo"),
        ("multipart/form-data; boundary=x", MULTIPART_BODY),
        ("application/xml", "<task type='echo'/>"),
    ],
    ids=["text", "form", "multipart", "xml"],
)
def test_a_body_that_is_not_json_is_a_415(client, unchanged, content_type, data):
    # Given a body sent with a content type other than JSON
    # When it is posted
    response = client.post(TASKS, data=data, headers={"Content-Type": content_type})
    # Then 415 unsupported_media_type, even though the text might be JSON
    assert_error(response, 415, "unsupported_media_type")


def test_a_body_without_a_content_type_is_a_415(client, unchanged):
    # Given a JSON body sent with no Content-Type header at all
    response = client.post(TASKS, data=b'{"type": "echo"}')
    # Then 415, and the message says what was missing
    body = assert_error(response, 415, "unsupported_media_type")
    assert "application/json" in body["message"]


def test_a_form_post_is_a_415(client, unchanged):
    # Given an HTML form post (Flask's test client encodes a dict as a form)
    response = client.post(TASKS, data={"type": "echo"})
    # Then 415
    assert_error(response, 415, "unsupported_media_type")


def test_a_body_over_the_size_limit_is_a_413(client, stack, unchanged):
    # Given a well-formed JSON body of about 1.1 MiB (limit: api.max_body_bytes, 1 MiB)
    limit = stack.settings.api.max_body_bytes
    body = json.dumps({"type": "echo", "parameters": {"blob": "x" * int(limit * 1.1)}})
    assert len(body) > limit
    # When it is posted
    response = client.post(TASKS, data=body, content_type="application/json")
    # Then 413 payload_too_large, naming the limit
    error = assert_error(response, 413, "payload_too_large")
    assert str(limit) in error["message"]


def test_a_batch_over_the_size_limit_is_a_413_too(client, stack, unchanged):
    # Given a batch body above the limit
    limit = stack.settings.api.max_body_bytes
    item = {"type": "echo", "parameters": {"blob": "y" * 1000}}
    body = json.dumps({"tasks": [item] * (limit // 1000 + 100)})
    # When it is posted / Then 413
    assert_error(client.post(f"{TASKS}/batch", data=body, content_type="application/json"), 413, "payload_too_large")


def test_a_body_just_under_the_size_limit_is_accepted(client, stack, queue):
    # Given a JSON body just under the limit (the limit is not off by much)
    limit = stack.settings.api.max_body_bytes
    payload = {"type": "echo", "parameters": {"blob": ""}, "queue": queue}
    payload["parameters"]["blob"] = "z" * (limit - len(json.dumps(payload)) - 16)
    # When it is posted / Then it is accepted
    response = client.post(TASKS, json=payload)
    assert response.status_code == 202, response.get_data(as_text=True)[:500]


# --------------------------------------------------------------------------- 404, 405


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v2/tasks", "/", "/api/v1/tasks/x/y/z"])
def test_an_unknown_route_is_a_json_404(client, unchanged, path):
    # Given a path the API does not serve / When requested / Then a JSON 404, not an HTML page
    assert_error(client.get(path), 404, "not_found")


@pytest.mark.parametrize("method", ["get", "delete"])
def test_an_unknown_task_id_is_a_404(client, unchanged, method):
    # Given an id no task has
    task_id = str(uuid.uuid4())
    # When it is read or cancelled
    response = getattr(client, method)(f"{TASKS}/{task_id}")
    # Then 404 not_found naming the id
    body = assert_error(response, 404, "not_found", field="id")
    assert task_id in body["message"]


def test_retrying_an_unknown_task_is_a_404(client, unchanged):
    assert_error(client.post(f"{TASKS}/{uuid.uuid4()}/retry"), 404, "not_found")


@pytest.mark.parametrize("method", ["get", "delete"])
def test_a_task_id_with_a_nul_character_is_a_404_not_a_database_error(client, unchanged, method):
    # Given an id no task can have, with a NUL (%00) in it
    # When it is read or cancelled / Then 404 naming the path parameter, like any unknown id
    assert_error(getattr(client, method)(f"{TASKS}/a%00b"), 404, "not_found", field="task_id")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("put", TASKS, {"GET", "POST"}),
        ("patch", TASKS, {"GET", "POST"}),
        ("delete", TASKS, {"GET", "POST"}),
        ("put", f"{TASKS}/some-id", {"GET", "DELETE"}),
        ("get", f"{TASKS}/some-id/retry", {"POST"}),
        ("post", "/healthz", {"GET"}),
    ],
)
def test_a_wrong_method_is_a_405_with_an_allow_header(client, unchanged, method, path, allowed):
    # Given a route that exists, called with a method it does not serve
    response = getattr(client, method)(path, json={"type": "echo"})
    # Then 405 method_not_allowed, and Allow lists the methods that would work
    assert_error(response, 405, "method_not_allowed")
    allow = {m.strip() for m in response.headers["Allow"].split(",")}
    assert allowed <= allow
    assert method.upper() not in allow


# --------------------------------------------------------------------------- 409


def test_cancelling_a_task_twice_is_a_409_the_second_time(client, stack, queue):
    # Given a queued task (no agent consumes its queue) that was cancelled once
    created = client.post(TASKS, json={"type": "echo", "parameters": {}, "queue": queue})
    assert created.status_code == 202
    task_id = created.json["id"]
    first = client.delete(f"{TASKS}/{task_id}")
    assert first.status_code == 200, first.json
    assert first.json["state"] == "CANCELLED"
    before = row_counts(stack)
    # When it is cancelled again
    second = client.delete(f"{TASKS}/{task_id}")
    # Then 409 conflict, reporting the state it is in, and nothing was written
    body = assert_error(second, 409, "conflict")
    assert body["state"] == "CANCELLED"
    assert row_counts(stack) == before


@pytest.mark.parametrize("final", [TaskState.SUCCEEDED, TaskState.FAILED, TaskState.TIMED_OUT])
def test_cancelling_a_finished_task_is_a_409(client, stack, queue, final):
    # Given a task that already finished
    task_id = finished_task(stack, queue, final)
    before = row_counts(stack)
    # When it is cancelled
    response = client.delete(f"{TASKS}/{task_id}")
    # Then 409, and the task keeps its final state
    body = assert_error(response, 409, "conflict")
    assert body["state"] == final.value
    assert row_counts(stack) == before
    assert client.get(f"{TASKS}/{task_id}").json["state"] == final.value


def test_retrying_a_succeeded_task_is_a_409(client, stack, queue):
    # Given a task that succeeded / When a retry is asked for / Then 409 and no new task
    task_id = finished_task(stack, queue)
    before = row_counts(stack)
    assert_error(client.post(f"{TASKS}/{task_id}/retry"), 409, "conflict")
    assert row_counts(stack) == before


def test_reusing_an_idempotency_key_for_a_different_request_is_a_409(client, stack, queue):
    # Given a task submitted with an Idempotency-Key
    key = f"k-{uuid.uuid4()}"
    first = client.post(
        TASKS, json={"type": "echo", "parameters": {"a": 1}, "queue": queue}, headers={"Idempotency-Key": key}
    )
    assert first.status_code == 202
    before = row_counts(stack)
    # When the same key comes with a different request
    second = client.post(
        TASKS, json={"type": "echo", "parameters": {"a": 2}, "queue": queue}, headers={"Idempotency-Key": key}
    )
    # Then 409 naming the header, and nothing new is stored
    assert_error(second, 409, "conflict", field="Idempotency-Key")
    assert row_counts(stack) == before


# --------------------------------------------------------------------------- 422 on submit


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"type": "no.such.type"}, "type", "unknown_task_type"),
        ({"type": "sleep", "parameters": {"seconds": "-1"}}, "parameters.seconds", None),
        ({"type": "sleep", "parameters": {"seconds": -1}}, "parameters.seconds", None),
        ({"type": "sleep", "parameters": {}}, "parameters.seconds", None),
        ({"type": "sleep", "parameters": {"seconds": 1, "extra": True}}, "parameters.extra", None),
        ({"type": "echo", "parameters": [1, 2]}, "parameters", None),
        ({"type": "echo", "priority": 10}, "priority", None),
        ({"type": "echo", "priority": -1}, "priority", None),
        ({"type": "echo", "priority": "5"}, "priority", None),
        ({"type": "echo", "priority": 5.5}, "priority", None),
        ({"type": "echo", "priority": True}, "priority", None),
        ({"type": "echo", "timeout_s": 3601}, "timeout_s", None),
        ({"type": "echo", "timeout_s": 0}, "timeout_s", None),
        ({"type": "echo", "max_retries": 101}, "max_retries", None),
        ({"type": "echo", "state": "SUCCEEDED"}, "state", None),
        ({"type": "echo", "attempts": 0}, "attempts", None),
        ({"type": "echo", "id": "00000000-0000-0000-0000-000000000000"}, "id", None),
        ({"type": "echo", "result": {"x": 1}}, "result", None),
        ({"type": "echo", "queue": "Bad Queue!"}, "queue", None),
        ({"type": "echo", "queue": ""}, "queue", None),
        ({"type": "echo", "queue": "x" * 65}, "queue", None),
        ({"type": ""}, "type", None),
        ({"type": 42}, "type", None),
        ({"parameters": {}}, "type", None),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else str(v),
)
def test_an_invalid_task_is_a_422_naming_the_field(client, unchanged, body, field, code):
    # Given a well-formed JSON object that is not a valid task
    # When it is submitted
    response = client.post(TASKS, json=body)
    # Then 422 naming the offending field, and no task is stored
    assert_error(response, 422, code or "validation_failed", field=field)


def test_a_timeout_above_the_orchestrator_limit_names_the_limit(client, stack, unchanged):
    # Given timeout_s one second above orchestrator.task_timeout_s
    limit = stack.settings.orchestrator.task_timeout_s
    response = client.post(TASKS, json={"type": "echo", "timeout_s": limit + 1})
    # Then 422 on timeout_s, and the message names the setting
    body = assert_error(response, 422, "validation_failed", field="timeout_s")
    assert "orchestrator.task_timeout_s" in body["message"]


@pytest.mark.parametrize("body", [[{"type": "echo"}], "echo", 42, None, True])
def test_a_body_that_is_not_a_json_object_is_a_422(client, unchanged, body):
    # Given valid JSON that is a list, string, number, null or boolean
    response = client.post(TASKS, data=json.dumps(body), content_type="application/json")
    # Then 422 naming the body
    assert_error(response, 422, "validation_failed", field="body")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tasks": []}, "tasks"),
        ({"tasks": "echo"}, "tasks"),
        ({"tasks": [{"type": "echo"}], "extra": 1}, "extra"),
        ({"tasks": [{"type": "echo"}, {"type": "nope"}]}, "tasks.1.type"),
        ({"tasks": [{"type": "echo"}, {"type": "echo", "state": "QUEUED"}]}, "tasks.1.state"),
        ({"tasks": [{"type": "sleep", "parameters": {"seconds": -1}}]}, "tasks.0.parameters.seconds"),
    ],
)
def test_an_invalid_batch_is_a_422_and_stores_none_of_its_tasks(client, unchanged, body, field):
    # Given a batch with one bad part (the others fine)
    # When it is submitted / Then 422 names the part, and not even the good tasks are stored
    error = assert_error(client.post(f"{TASKS}/batch", json=body), 422, field=field)
    # And the message starts with the path of the offending part ("tasks.1: ...", "tasks.1.state: ...")
    lead = error["message"].split(":")[0]
    assert field.startswith(lead), error


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_a_bad_idempotency_key_is_a_422(client, unchanged, key):
    response = client.post(TASKS, json={"type": "echo"}, headers={"Idempotency-Key": key})
    assert_error(response, 422, "validation_failed", field="Idempotency-Key")


# --------------------------------------------------------------------------- 422 on list


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("state=BOGUS", "state"),
        ("state=QUEUED,BOGUS", "state"),
        ("limit=0", "limit"),
        ("limit=-5", "limit"),
        ("limit=100000", "limit"),
        ("limit=abc", "limit"),
        ("priority=10", "priority"),
        ("cursor=garbage", "cursor"),
        ("created_after=notatime", "created_after"),
        ("created_before=2024-13-45T99:00:00Z", "created_before"),
        ("colour=blue", "colour"),
        ("type=ec%00ho", "type"),
        ("fields=bogus", "fields"),
        ("fields=result,bogus", "fields"),
        ("fields=,", "fields"),
        (
            f"cursor={base64.urlsafe_b64encode(json.dumps(['2024-01-01T00:00:00Z', 'a' + chr(0)]).encode()).decode()}",
            "cursor",
        ),
    ],
)
def test_a_bad_list_query_is_a_422_naming_the_parameter(client, unchanged, query, field):
    # Given a list request with one bad query parameter
    response = client.get(f"{TASKS}?{query}")
    # Then 422 naming it
    assert_error(response, 422, "validation_failed", field=field)


# --------------------------------------------------------------------------- health


def test_healthz_answers_200(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_answers_200_when_the_database_and_the_broker_are_up(client):
    # Given the real PostgreSQL (migrated) and Redis
    response = client.get("/readyz")
    # Then ready, with each check ok
    assert response.status_code == 200, response.json
    assert response.json["status"] == "ready"
    assert response.json["checks"]["database"]["ok"] is True
    assert response.json["checks"]["broker"]["ok"] is True


# --------------------------------------------------------------------------- keyset pagination


def test_the_task_list_pages_newest_first_without_duplicates(client, queue):
    # Given 7 echo tasks created one after another on a queue no agent consumes (so they stay QUEUED)
    since = isoformat(utcnow())
    created = []
    for index in range(7):
        response = client.post(TASKS, json={"type": "echo", "parameters": {"i": index}, "queue": queue})
        assert response.status_code == 202, response.json
        assert response.json["state"] == "QUEUED"
        created.append(response.json["id"])
    # When the list, filtered to them, is read 3 at a time following next_cursor
    pages: list[list[str]] = []
    url = f"{TASKS}?limit=3&type=echo&state=QUEUED&created_after={since}"
    cursor = None
    while True:
        response = client.get(url + (f"&cursor={cursor}" if cursor else ""))
        assert response.status_code == 200, response.json
        pages.append([task["id"] for task in response.json["tasks"]])
        assert all(task["state"] == "QUEUED" and task["type"] == "echo" for task in response.json["tasks"])
        cursor = response.json["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "next_cursor never ran out"
    # Then the pages hold 3, 3 and 1 tasks: every task once, newest first
    seen = [task_id for page in pages for task_id in page]
    assert [len(page) for page in pages] == [3, 3, 1]
    assert len(seen) == len(set(seen))
    assert seen == list(reversed(created))


def test_a_cursor_from_one_page_continues_after_its_last_task(client, queue):
    # Given 4 queued tasks
    since = isoformat(utcnow())
    created = [client.post(TASKS, json={"type": "echo", "queue": queue}).json["id"] for _ in range(4)]
    # When the first page of 2 is read and its cursor followed
    first = client.get(f"{TASKS}?limit=2&created_after={since}").json
    second = client.get(f"{TASKS}?limit=2&created_after={since}&cursor={first['next_cursor']}").json
    # Then the second page holds exactly the two older tasks, and it is the last page
    assert [t["id"] for t in first["tasks"]] == [created[3], created[2]]
    assert [t["id"] for t in second["tasks"]] == [created[1], created[0]]
    assert second["next_cursor"] is None
