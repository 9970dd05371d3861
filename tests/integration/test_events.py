"""Progress reports and live event streams, on PostgreSQL + Redis + a real worker + a real API (gunicorn).

A ``test.progress`` task reports 10, 20, ... 100 percent; its Server-Sent Events stream must deliver
those reports in order, then the final state, then ``end``, and close by itself. Streams resume from
``Last-Event-ID`` without duplicates, refuse what they should (404/401/403/422/503) as JSON, and the
cluster stream shows task lifecycles and agent status changes. Progress from a run that was fenced off
is ignored, and a handler reporting in a tight loop is rate-limited.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import requests
from sqlalchemy import select

from aios.db import session_scope
from aios.models import TaskEvent
from aios.tasktypes import TaskContext
from tests.conftest import authorize, make_user, wait_for
from tests.support.sse import Message, open_stream
from workers import runner

pytestmark = pytest.mark.integration

TEN_STEPS = [float(10 * n) for n in range(1, 11)]


def submit(api_url: str, key: str, body: dict[str, Any]) -> str:
    response = requests.post(f"{api_url}/api/v1/tasks", json=body, headers={"X-API-Key": key}, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def progress_of(messages: list[Message]) -> list[float]:
    return [m.data["percent"] for m in messages if m.event == "progress"]


def test_a_task_stream_delivers_progress_10_to_100_in_order_then_the_final_state_and_closes(
    stack, start_api, start_worker, queue
):
    # Given a real agent, a real API, a viewer, and a task that reports ten steps
    api = start_api()
    start_worker([queue])
    operator, viewer = make_user(stack, "operator"), make_user(stack, "viewer")
    task_id = submit(
        api.url, operator.key, {"type": "test.progress", "queue": queue, "parameters": {"steps": 10, "sleep_s": 0.3}}
    )

    # When the viewer opens the task's event stream and reads it until the server closes it
    stream = open_stream(f"{api.url}/api/v1/tasks/{task_id}/events", key=viewer.key)
    assert stream.response.status_code == 200, stream.response.text
    assert stream.response.headers["Content-Type"].startswith("text/event-stream")
    assert stream.response.headers.get("X-Request-ID")
    started = time.monotonic()
    messages = stream.read_all()

    # Then it ended by itself, after the task's whole life: 10..100 in order, then SUCCEEDED, then end
    assert stream.ended_by_server
    assert time.monotonic() - started < 60
    assert progress_of(messages) == TEN_STEPS
    states = [m.data["to_state"] for m in messages if m.event == "state"]
    assert states[-1] == "SUCCEEDED" and "RUNNING" in states, states
    assert [m.event for m in messages][-2:] == ["state", "end"]
    last_progress = max(i for i, m in enumerate(messages) if m.event == "progress")
    assert last_progress < len(messages) - 2  # every report came before the final state
    # And every event carries its task_events id, increasing
    ids = [int(m.id) for m in messages if m.event != "end"]
    assert ids == sorted(set(ids))
    assert messages[-1].data == {"task_id": task_id, "last_event_id": ids[-1]}
    assert [m.data["message"] for m in messages if m.event == "progress"][-1] == "step 10 of 10"

    # And the task shows its last progress
    task = requests.get(f"{api.url}/api/v1/tasks/{task_id}", headers={"X-API-Key": viewer.key}, timeout=30).json()
    assert (task["progress"], task["progress_message"]) == (100.0, "step 10 of 10")

    # When the finished task's stream is opened again, it replays the same events and closes at once
    again = open_stream(f"{api.url}/api/v1/tasks/{task_id}/events", key=viewer.key)
    started = time.monotonic()
    replay = again.read_all()
    assert time.monotonic() - started < 10
    assert [(m.id, m.event, m.data) for m in replay] == [(m.id, m.event, m.data) for m in messages]


def test_a_reconnect_with_last_event_id_resumes_without_duplicates(stack, start_api, start_worker, queue):
    # Given a task reporting ten steps slowly, and a stream read until 40 percent, then dropped
    api = start_api()
    start_worker([queue])
    operator = make_user(stack, "operator")
    task_id = submit(
        api.url, operator.key, {"type": "test.progress", "queue": queue, "parameters": {"steps": 10, "sleep_s": 0.5}}
    )
    url = f"{api.url}/api/v1/tasks/{task_id}/events"
    first = open_stream(url, key=operator.key)
    seen: list[Message] = []
    for message in first:
        seen.append(message)
        if message.event == "progress" and message.data["percent"] == 40.0:
            break
    first.close()
    assert progress_of(seen) == [10.0, 20.0, 30.0, 40.0]

    # When the client reconnects with the id of the last event it got
    second = open_stream(url, key=operator.key, headers={"Last-Event-ID": seen[-1].id})
    rest = second.read_all()

    # Then it gets everything after that event exactly once, up to the end
    assert second.ended_by_server
    combined = seen + rest
    ids = [m.id for m in combined if m.event != "end"]
    assert len(ids) == len(set(ids)), ids
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)
    assert progress_of(combined) == TEN_STEPS
    assert rest[-1].event == "end" and rest[-2].data["to_state"] == "SUCCEEDED"
    # And the whole timeline was delivered: the database has nothing the two streams missed
    with session_scope(stack.settings.database) as session:
        stored = list(session.scalars(select(TaskEvent.id).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)))
    assert [int(i) for i in ids] == stored

    # And ?after= (for clients that cannot send headers) resumes the same way
    after = open_stream(url, key=operator.key, params={"after": seen[-1].id}).read_all()
    assert [m.id for m in after] == [m.id for m in rest]


def test_a_stream_refuses_an_unknown_task_bad_cursor_missing_credentials_and_the_agent_role_as_json(
    stack, api_app, client
):
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    agent = authorize(api_app.test_client(), make_user(stack, "agent").key)
    task_id = client.post("/api/v1/tasks", json={"type": "echo", "queue": "nobody-serves-this"}).json["id"]

    unknown = viewer.get("/api/v1/tasks/no-such-task/events")
    assert unknown.status_code == 404 and unknown.is_json and unknown.json["error"] == "not_found"

    anonymous = api_app.test_client().get(f"/api/v1/tasks/{task_id}/events")
    assert anonymous.status_code == 401 and anonymous.is_json
    assert api_app.test_client().get("/api/v1/events").status_code == 401

    forbidden = agent.get(f"/api/v1/tasks/{task_id}/events")
    assert forbidden.status_code == 403 and forbidden.is_json
    assert agent.get("/api/v1/events").status_code == 403

    for path, headers in [
        (f"/api/v1/tasks/{task_id}/events?after=abc", {}),
        (f"/api/v1/tasks/{task_id}/events", {"Last-Event-ID": "-1"}),
        ("/api/v1/events?after=12", {}),
        ("/api/v1/events", {"Last-Event-ID": "1:x"}),
        ("/api/v1/events?types=task,jobs", {}),
        ("/api/v1/events?state=RUNNING,SLEEPING", {}),
    ]:
        refused = viewer.get(path, headers=headers)
        assert refused.status_code == 422 and refused.is_json, (path, refused.status_code)

    # And a viewer may open both streams; a response closed unread gives its slot back
    for path in (f"/api/v1/tasks/{task_id}/events", "/api/v1/events"):
        opened = viewer.get(path)
        assert opened.status_code == 200 and opened.mimetype == "text/event-stream", path
        assert api_app.extensions["aios_thread_budget"].held["sse"] == 1
        opened.close()
        assert api_app.extensions["aios_thread_budget"].held["sse"] == 0
    client.delete(f"/api/v1/tasks/{task_id}")


def test_progress_from_a_run_that_was_fenced_off_is_ignored(stack, client, ledger):
    # Given a task claimed by a run (through the runner's own claim), which reports 10 percent
    task_id = client.post("/api/v1/tasks", json={"type": "test.progress", "queue": "nobody-serves-this"}).json["id"]
    dispatch_id = ledger.wait_state(task_id, "QUEUED").dispatch_id
    work = runner.claim(stack.settings, task_id, dispatch_id, "fenced@test")
    assert work is not None
    run = TaskContext(
        task_id=task_id, attempt=work.attempt, agent="fenced@test", settings=stack.settings, dispatch_id=dispatch_id
    )
    assert run.progress(10, "started") is True
    assert (ledger.task(task_id).progress, ledger.task(task_id).progress_message) == (10.0, "started")

    # And a stale run of the same task (an older dispatch) that also reports
    stale = TaskContext(
        task_id=task_id,
        attempt=work.attempt,
        agent="stale@test",
        settings=stack.settings,
        dispatch_id="00000000-0000-0000-0000-000000000000",
    )
    assert stale.progress(90, "stale") is False

    # When the task is cancelled, and the run reports again (100 is never rate-limited)
    assert client.delete(f"/api/v1/tasks/{task_id}").status_code == 200
    ledger.wait_state(task_id, "CANCELLED")
    assert run.progress(100, "done") is False
    assert run.progress(100, "done again") is False  # once fenced off, it does not even try

    # Then neither the stale nor the cancelled run changed the task or its timeline
    task = ledger.task(task_id)
    assert (task.progress, task.progress_message) == (10.0, "started")
    reports = [e.detail for e in ledger.events(task_id) if e.detail and "progress" in e.detail]
    assert reports == [{"progress": 10.0, "message": "started"}]


def test_progress_reports_in_a_tight_loop_are_rate_limited_and_the_last_one_is_written_at_the_end(
    stack, client, ledger
):
    # Given a claimed run
    task_id = client.post("/api/v1/tasks", json={"type": "test.progress", "queue": "nobody-serves-this"}).json["id"]
    dispatch_id = ledger.wait_state(task_id, "QUEUED").dispatch_id
    assert runner.claim(stack.settings, task_id, dispatch_id, "busy@test") is not None
    run = TaskContext(task_id=task_id, attempt=1, agent="busy@test", settings=stack.settings, dispatch_id=dispatch_id)

    # When it reports 1..50 as fast as it can
    for percent in range(1, 51):
        assert run.progress(percent) is True

    # Then far fewer than 50 reports were written (one per 0.2 s), the first one at once
    written = [e.detail["progress"] for e in ledger.events(task_id) if e.detail and "progress" in e.detail]
    assert written[0] == 1.0 and len(written) < 25, written
    # And the held last report is written when the run ends (the runner flushes before finishing)
    assert run.flush_progress() is True
    assert ledger.task(task_id).progress == 50.0
    # And 100 is written at once, however soon after the previous report
    assert run.progress(100, "done") is True
    assert (ledger.task(task_id).progress, ledger.task(task_id).progress_message) == (100.0, "done")

    # And bad values are refused as the handler's bug, writing nothing
    for bad in (-1, 100.5, float("nan"), True, "50"):
        with pytest.raises(Exception, match="percent"):
            run.progress(bad)  # type: ignore[arg-type]
    assert ledger.task(task_id).progress == 100.0
    client.delete(f"/api/v1/tasks/{task_id}")


def test_the_cluster_stream_shows_a_task_lifecycle_and_an_agent_status_change_with_filters(
    stack, start_api, start_worker, queue
):
    # Given a real agent and API, and two cluster streams opened before anything happens:
    # task events of test.progress tasks, and the agent's own events
    api = start_api()
    worker = start_worker([queue])
    operator, viewer = make_user(stack, "operator"), make_user(stack, "viewer")
    tasks_only = open_stream(
        f"{api.url}/api/v1/events", key=viewer.key, params={"types": "task", "type": "test.progress"}
    )
    agent_only = open_stream(
        f"{api.url}/api/v1/events", key=viewer.key, params={"types": "agent", "agent": worker.hostname}
    )
    assert tasks_only.response.status_code == 200 and agent_only.response.status_code == 200

    # When a task runs to its end, and the agent is then drained
    task_id = submit(
        api.url, operator.key, {"type": "test.progress", "queue": queue, "parameters": {"steps": 3, "sleep_s": 0.2}}
    )
    task_messages: list[Message] = []
    for message in tasks_only:
        assert message.event in ("state", "progress", "note") and message.data["type"] == "test.progress"
        if message.data["task_id"] == task_id:
            task_messages.append(message)
            if message.data["to_state"] == "SUCCEEDED":
                break
    patched = requests.patch(
        f"{api.url}/api/v1/agents/{worker.hostname}",
        json={"status": "DRAINING"},
        headers={"X-API-Key": operator.key},
        timeout=30,
    )
    assert patched.status_code == 200, patched.text
    agent_messages: list[Message] = []
    for message in agent_only:
        assert message.event == "agent" and message.data["agent"] == worker.hostname
        agent_messages.append(message)
        if message.data["to_status"] == "DRAINING":
            break

    # Then the task stream showed its whole lifecycle in order, with the progress reports between
    states = [m.data["to_state"] for m in task_messages if m.event == "state"]
    assert states[:3] == ["PENDING", "QUEUED", "RUNNING"] or states[:2] == ["QUEUED", "RUNNING"], states
    assert states[-1] == "SUCCEEDED"
    assert progress_of(task_messages) == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert all(m.data["agent"] == worker.hostname for m in task_messages if m.data["to_state"] == "SUCCEEDED")
    # And the agent stream showed the status change
    assert agent_messages[-1].data["to_status"] == "DRAINING"
    # And each id is a resumable <task_event_id>:<agent_event_id> cursor that only moves forward
    cursors = [tuple(int(p) for p in m.id.split(":")) for m in task_messages]
    assert cursors == sorted(cursors)

    # When a new stream resumes from the cursor of the task's RUNNING event
    running = next(m for m in task_messages if m.data["to_state"] == "RUNNING")
    tasks_only.close()
    agent_only.close()
    resumed = open_stream(
        f"{api.url}/api/v1/events",
        key=viewer.key,
        headers={"Last-Event-ID": running.id},
        params={"types": "task", "type": "test.progress"},
    )
    replayed: list[Message] = []
    for message in resumed:
        if message.data["task_id"] == task_id:
            replayed.append(message)
            if message.data["to_state"] == "SUCCEEDED":
                break
    resumed.close()

    # Then it delivers what followed that event, and nothing before it
    after_running = task_messages[task_messages.index(running) + 1 :]
    assert [(m.id, m.event) for m in replayed] == [(m.id, m.event) for m in after_running]

    # Finally, the agent takes work again
    requests.patch(
        f"{api.url}/api/v1/agents/{worker.hostname}",
        json={"status": "ONLINE"},
        headers={"X-API-Key": operator.key},
        timeout=30,
    )


def test_streams_beyond_a_process_limit_get_503_and_a_closed_stream_frees_its_slot(stack, start_api):
    # Given an API process that serves one stream at most, and that stream open
    api = start_api(env={"AIOS_API__SSE_MAX_STREAMS": "1"})
    viewer = make_user(stack, "viewer")
    first = open_stream(f"{api.url}/api/v1/events", key=viewer.key)
    assert first.response.status_code == 200

    # When a second stream is asked for, it is refused with a JSON 503 and Retry-After
    second = requests.get(f"{api.url}/api/v1/events", headers={"X-API-Key": viewer.key}, timeout=30)
    assert second.status_code == 503 and second.json()["error"] == "service_unavailable", second.text
    assert second.headers["Retry-After"]
    # And ordinary requests are still answered while the stream is open
    assert (
        requests.get(f"{api.url}/api/v1/tasks/types", headers={"X-API-Key": viewer.key}, timeout=30).status_code == 200
    )

    # When the first client goes away, its slot is free again soon (not only at the next heartbeat)
    first.close()

    def accepted() -> bool:
        response = requests.get(f"{api.url}/api/v1/events", headers={"X-API-Key": viewer.key}, stream=True, timeout=30)
        try:
            return response.status_code == 200
        finally:
            response.close()

    wait_for(accepted, timeout=12, interval=0.5, what="the closed stream's slot to be free")
