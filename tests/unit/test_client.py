"""The Python client against a scripted local HTTP server: retries, Retry-After, error mapping, tokens, SSE.

The server (``http.server`` in a thread, a real socket) answers each request with the next answer
planned for its method and path and records what it received, so a test can say exactly what a
misbehaving API did and check exactly what the client sent back.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from aios_client import client as aios_client
from aios_client.client import (
    AiosError,
    Client,
    Conflict,
    ConnectionFailed,
    Event,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    TaskFailed,
    Unauthorized,
    UnknownTaskType,
    ValidationFailed,
    WaitTimeout,
    parse_retry_after,
    parse_sse,
)


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


@dataclass
class Answer:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: "drop": close the connection without answering (the request arrived; its answer is lost).
    #: A callable: write the answer yourself (streams).
    action: str | Callable[[BaseHTTPRequestHandler], None] | None = None


class ScriptedApi:
    def __init__(self) -> None:
        self.plans: dict[tuple[str, str], deque[Answer]] = defaultdict(deque)
        self.seen: list[Seen] = []
        script = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                script.seen.append(
                    Seen(
                        self.command,
                        self.path,
                        dict(self.headers.items()),
                        json.loads(raw) if raw else None,
                        time.monotonic(),
                    )
                )
                queue = script.plans.get((self.command, path))
                answer = queue.popleft() if queue else Answer(599, {"error": "unplanned", "message": self.path})
                if answer.action == "drop":
                    self.close_connection = True
                    return
                if callable(answer.action):
                    answer.action(self)
                    return
                data = (
                    b""
                    if answer.body is None
                    else (answer.body.encode() if isinstance(answer.body, str) else json.dumps(answer.body).encode())
                )
                self.send_response(answer.status)
                content_type = "text/html" if isinstance(answer.body, str) else "application/json"
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def plan(self, method: str, path: str, *answers: Answer) -> None:
        self.plans[(method, path)].extend(answers)

    def requests_to(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.split("?", 1)[0] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def api() -> Iterator[ScriptedApi]:
    server = ScriptedApi()
    yield server
    server.close()


def task(state: str = "QUEUED", **extra: Any) -> dict[str, Any]:
    return {"id": "t-1", "type": "echo", "state": state, "result": None, "error": None, **extra}


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_in_seconds_is_read_as_seconds():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("1.5") == 1.5


def test_retry_after_as_an_http_date_is_the_time_until_that_date():
    # Given a fixed "now" and a date 90 s later in the RFC 9110 (IMF-fixdate) form
    now = datetime(2030, 1, 31, 9, 0, 0, tzinfo=UTC)
    header = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert header == "Thu, 31 Jan 2030 09:01:30 GMT"
    # Then the delay is those 90 s, and a date in the past is no delay at all
    assert parse_retry_after(header, now=now) == 90.0
    assert parse_retry_after("Thu, 31 Jan 2030 08:00:00 GMT", now=now) == 0.0


def test_an_absent_or_unreadable_retry_after_leaves_the_delay_to_the_client():
    for value in (None, "", "soon", "-", "inf", "nan"):
        assert parse_retry_after(value) is None, value
    assert parse_retry_after("-3") == 0.0


def test_a_429_is_retried_after_retry_after_seconds(api):
    # Given an API that refuses the first submit with 429 and Retry-After: 1, then accepts it
    api.plan(
        "POST",
        "/api/v1/tasks",
        Answer(429, {"error": "too_many_requests", "message": "slow down", "retry_after_s": 1}, {"Retry-After": "1"}),
        Answer(202, task()),
    )
    with Client(api.url, api_key="aios_k") as aios:
        # When the client submits
        started = time.monotonic()
        accepted = aios.submit("echo", {"n": 1})
    # Then it got the task, having sent the request twice, the second at least 1 s after the first
    assert accepted["id"] == "t-1"
    first, second = api.requests_to("POST", "/api/v1/tasks")
    assert second.at - first.at >= 0.95
    assert time.monotonic() - started >= 0.95


def test_a_503_with_an_http_date_retry_after_is_retried_at_that_date(api):
    # Given a 503 whose Retry-After is a date 2 s ahead (HTTP dates have whole seconds: 1-2 s from now)
    when = datetime.now(UTC) + timedelta(seconds=2)
    api.plan(
        "GET",
        "/api/v1/tasks/t-1",
        Answer(
            503,
            {"error": "service_unavailable", "message": "database down"},
            {"Retry-After": format_datetime(when, usegmt=True)},
        ),
        Answer(200, task("RUNNING")),
    )
    with Client(api.url, api_key="aios_k") as aios:
        assert aios.get("t-1")["state"] == "RUNNING"
    first, second = api.requests_to("GET", "/api/v1/tasks/t-1")
    assert second.at - first.at >= 0.9


def test_a_retry_after_longer_than_the_client_waits_is_raised_at_once(api):
    # Given a 429 asking for 900 s (a locked login) and a client that waits at most 60 s
    api.plan(
        "POST",
        "/api/v1/tasks",
        Answer(429, {"error": "too_many_requests", "message": "locked", "retry_after_s": 900}, {"Retry-After": "900"}),
    )
    with Client(api.url, api_key="aios_k", max_retry_after_s=60) as aios:
        started = time.monotonic()
        with pytest.raises(RateLimited) as raised:
            aios.submit("echo")
    # Then it did not wait and did not resend; the error says when to come back
    assert time.monotonic() - started < 5
    assert len(api.requests_to("POST", "/api/v1/tasks")) == 1
    assert raised.value.status == 429 and raised.value.retry_after_s == 900


def test_a_503_still_answered_after_every_retry_is_raised_as_service_unavailable(api):
    unavailable = Answer(503, {"error": "database_not_migrated", "message": "run aios db upgrade"})
    api.plan("GET", "/api/v1/status", unavailable, unavailable, unavailable)
    with Client(api.url, api_key="aios_k", retries=2) as aios:
        with pytest.raises(ServiceUnavailable) as raised:
            aios.status()
    assert raised.value.code == "database_not_migrated"
    assert type(raised.value).__name__ == "DatabaseNotMigrated"
    assert len(api.requests_to("GET", "/api/v1/status")) == 3  # the first try and 2 retries


# --------------------------------------------------------------------------- no duplicate submits


def test_a_submit_retried_after_a_503_sends_the_same_idempotency_key_both_times(api):
    # Given an API that answers the first submit with 503 and the second with 202
    api.plan(
        "POST", "/api/v1/tasks", Answer(503, {"error": "service_unavailable", "message": "down"}), Answer(202, task())
    )
    with Client(api.url, api_key="aios_k") as aios:
        aios.submit("echo", {"n": 1}, priority=9)
    # Then both requests carry one and the same Idempotency-Key, and the same body
    first, second = api.requests_to("POST", "/api/v1/tasks")
    assert first.headers["Idempotency-Key"] and first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert first.body == second.body == {"type": "echo", "parameters": {"n": 1}, "priority": 9}


def test_two_submits_send_different_idempotency_keys_unless_given_one(api):
    api.plan("POST", "/api/v1/tasks", *(Answer(202, task()) for _ in range(4)))
    with Client(api.url, api_key="aios_k") as aios:
        aios.submit("echo")
        aios.submit("echo")
        aios.submit("echo", idempotency_key="order-17")
        aios.submit("echo", idempotency_key="order-17")
    keys = [seen.headers["Idempotency-Key"] for seen in api.requests_to("POST", "/api/v1/tasks")]
    assert keys[0] != keys[1] and keys[2:] == ["order-17", "order-17"]


def test_a_submit_whose_answer_was_lost_is_resent_with_its_key_but_a_batch_is_not(api):
    # Given an API that receives each request and drops the connection before answering, once
    api.plan("POST", "/api/v1/tasks", Answer(action="drop"), Answer(202, task()))
    api.plan("POST", "/api/v1/tasks/batch", Answer(action="drop"), Answer(202, {"ids": ["x"], "count": 1}))
    with Client(api.url, api_key="aios_k") as aios:
        # When the client submits one task: it is resent (same key: the API returns the first task)
        assert aios.submit("echo")["id"] == "t-1"
        # When it submits a batch (a route without an idempotency key)
        with pytest.raises(ConnectionFailed):
            aios.submit_batch([{"type": "echo"}])
    submits = api.requests_to("POST", "/api/v1/tasks")
    assert len(submits) == 2 and submits[0].headers["Idempotency-Key"] == submits[1].headers["Idempotency-Key"]
    # Then the batch was sent once only: it may have been stored, and a resend would store it twice
    assert len(api.requests_to("POST", "/api/v1/tasks/batch")) == 1


def test_a_refused_connection_counts_as_never_sent():
    # Given a port nobody listens on
    from tests.conftest import free_port

    with pytest.raises(requests.ConnectionError) as raised:
        requests.post(f"http://127.0.0.1:{free_port()}/api/v1/tasks/batch", json={}, timeout=5)
    # Then the client may resend even a POST after that failure; not after a read timeout
    assert aios_client._never_sent(raised.value)
    assert not aios_client._never_sent(requests.ReadTimeout("read timed out"))


# --------------------------------------------------------------------------- errors


def test_error_answers_become_the_exception_of_their_code_with_field_and_body(api):
    api.plan(
        "POST",
        "/api/v1/tasks",
        Answer(422, {"error": "validation_failed", "message": "priority: too big", "field": "priority"}),
        Answer(422, {"error": "unknown_task_type", "message": "no type 'x'", "field": "type"}),
        Answer(409, {"error": "conflict", "message": "Idempotency-Key reused", "state": "QUEUED"}),
    )
    with Client(api.url, api_key="aios_k") as aios:
        with pytest.raises(ValidationFailed) as invalid:
            aios.submit("echo", priority=99)
        with pytest.raises(UnknownTaskType) as unknown:
            aios.submit("x")
        with pytest.raises(Conflict) as conflict:
            aios.submit("echo")
    assert (invalid.value.status, invalid.value.code, invalid.value.field) == (422, "validation_failed", "priority")
    assert invalid.value.message == "priority: too big"
    assert "priority: too big" in str(invalid.value) and "field priority" in str(invalid.value)
    assert isinstance(unknown.value, ValidationFailed) and unknown.value.field == "type"
    assert conflict.value.body["state"] == "QUEUED"


def test_an_unknown_code_falls_back_to_its_status_then_to_the_base_class(api):
    api.plan(
        "GET",
        "/api/v1/agents/a@b",
        Answer(404, {"error": "agent_gone", "message": "no agent a@b"}),
        Answer(418, {"error": "teapot", "message": "I am a teapot"}),
        Answer(502, "<html>Bad Gateway</html>"),
    )
    with Client(api.url, api_key="aios_k") as aios:
        with pytest.raises(NotFound) as by_status:
            aios.agent("a@b")
        with pytest.raises(AiosError) as base:
            aios.agent("a@b")
        with pytest.raises(AiosError) as not_json:
            aios.agent("a@b")
    assert by_status.value.code == "agent_gone"
    assert type(base.value) is AiosError and base.value.code == "teapot" and base.value.status == 418
    assert type(not_json.value) is AiosError and not_json.value.code == "http_502"
    assert "Bad Gateway" in not_json.value.message


def test_a_naive_datetime_is_refused_before_anything_is_sent(api):
    with Client(api.url, api_key="aios_k") as aios:
        with pytest.raises(ValueError, match="no time zone"):
            aios.submit("echo", run_at=datetime(2030, 1, 1, 9, 0))
        api.plan("POST", "/api/v1/tasks", Answer(202, task("SCHEDULED")))
        aios.submit("echo", run_at=datetime(2030, 1, 1, 9, 0, tzinfo=UTC))
    (sent,) = api.requests_to("POST", "/api/v1/tasks")
    assert sent.body["run_at"] == "2030-01-01T09:00:00+00:00"


def test_credentials_are_required_and_exclusive():
    with pytest.raises(ValueError, match="credentials required"):
        Client("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="not several"):
        Client("http://127.0.0.1:1", api_key="k", username="u", password="p")


# --------------------------------------------------------------------------- tokens


def test_a_token_session_refreshes_once_on_401_and_logs_out_on_close(api):
    # Given an API that logs "ann" in, then refuses the first access token as expired
    api.plan("POST", "/api/v1/auth/token", Answer(200, {"access_token": "a1", "refresh_token": "r1"}))
    api.plan(
        "GET",
        "/api/v1/tasks/t-1",
        Answer(401, {"error": "unauthorized", "message": "token expired"}),
        Answer(200, task("RUNNING")),
    )
    api.plan("POST", "/api/v1/auth/refresh", Answer(200, {"access_token": "a2"}))
    api.plan("POST", "/api/v1/auth/logout", Answer(200, {"revoked": True}))
    # When the client reads a task and is closed
    with Client(api.url, username="ann", password="pw") as aios:
        assert aios.get("t-1")["state"] == "RUNNING"
    # Then it logged in with the password, refreshed with the refresh token, resent with the new token
    assert [(s.method, s.path) for s in api.seen] == [
        ("POST", "/api/v1/auth/token"),
        ("GET", "/api/v1/tasks/t-1"),
        ("POST", "/api/v1/auth/refresh"),
        ("GET", "/api/v1/tasks/t-1"),
        ("POST", "/api/v1/auth/logout"),
    ]
    assert api.seen[0].body == {"username": "ann", "password": "pw"}
    assert api.seen[1].headers["Authorization"] == "Bearer a1"
    assert api.seen[2].headers["Authorization"] == "Bearer r1"
    assert api.seen[3].headers["Authorization"] == "Bearer a2"
    assert api.seen[4].headers["Authorization"] == "Bearer a2"


def test_an_expired_refresh_token_means_logging_in_again_and_a_second_401_is_raised(api):
    api.plan(
        "POST",
        "/api/v1/auth/token",
        Answer(200, {"access_token": "a1", "refresh_token": "r1"}),
        Answer(200, {"access_token": "a3", "refresh_token": "r3"}),
    )
    api.plan("POST", "/api/v1/auth/refresh", Answer(401, {"error": "unauthorized", "message": "expired"}))
    denied = Answer(401, {"error": "unauthorized", "message": "user disabled"})
    api.plan("GET", "/api/v1/status", denied, denied)
    aios = Client(api.url, username="ann", password="pw")
    with pytest.raises(Unauthorized, match="user disabled"):
        aios.status()
    statuses = api.requests_to("GET", "/api/v1/status")
    assert [s.headers["Authorization"] for s in statuses] == ["Bearer a1", "Bearer a3"]  # renewed once only
    assert len(api.requests_to("POST", "/api/v1/auth/token")) == 2
    api.plan("POST", "/api/v1/auth/logout", Answer(401, {"error": "unauthorized", "message": "x"}))
    aios.close()  # a failed logout does not make close() fail


# --------------------------------------------------------------------------- pages, waiting, events


def test_list_follows_next_cursor_until_the_last_page(api):
    api.plan(
        "GET",
        "/api/v1/tasks",
        Answer(200, {"tasks": [task(id="a"), task(id="b")], "next_cursor": "c1"}),
        Answer(200, {"tasks": [task(id="c")], "next_cursor": None}),
    )
    with Client(api.url, api_key="aios_k") as aios:
        ids = [t["id"] for t in aios.list(state=["QUEUED", "RUNNING"], type="echo", page_size=2)]
    assert ids == ["a", "b", "c"]
    first, second = (s.path for s in api.requests_to("GET", "/api/v1/tasks"))
    assert "state=QUEUED%2CRUNNING" in first and "limit=2" in first and "cursor" not in first
    assert "cursor=c1" in second


def test_wait_polls_until_the_task_is_finished_and_result_returns_its_result(api):
    api.plan(
        "GET",
        "/api/v1/tasks/t-1",
        Answer(200, task("QUEUED")),
        Answer(200, task("RUNNING")),
        Answer(200, task("SUCCEEDED", result={"n": 1})),
        Answer(200, task("SUCCEEDED", result={"n": 1})),
    )
    with Client(api.url, api_key="aios_k") as aios:
        assert aios.wait("t-1", timeout=10, poll_s=0.05)["state"] == "SUCCEEDED"
        assert aios.result("t-1", timeout=10) == {"n": 1}
    assert len(api.requests_to("GET", "/api/v1/tasks/t-1")) == 4


def test_result_of_a_failed_task_raises_task_failed_and_wait_gives_up_after_its_timeout(api):
    api.plan("GET", "/api/v1/tasks/t-1", Answer(200, task("FAILED", error="RuntimeError: boom")))
    api.plan("GET", "/api/v1/tasks/t-2", *(Answer(200, task("RUNNING", id="t-2")) for _ in range(50)))
    with Client(api.url, api_key="aios_k") as aios:
        with pytest.raises(TaskFailed) as failed:
            aios.result("t-1")
        started = time.monotonic()
        with pytest.raises(WaitTimeout) as waited:
            aios.wait("t-2", timeout=0.5, poll_s=0.1)
    assert failed.value.state == "FAILED" and "RuntimeError: boom" in str(failed.value)
    assert waited.value.task["state"] == "RUNNING" and 0.45 <= time.monotonic() - started < 5


def test_sse_lines_become_events():
    lines = [
        ": keep-alive",
        "event: state",
        'data: {"to_state": "RUNNING"}',
        "id: 7",
        "",
        "data: line one",
        "data: line two",
        "",
        "event: end",
        "data: {}",
        "",
    ]
    assert list(parse_sse(iter(lines))) == [
        Event(event="state", data={"to_state": "RUNNING"}, id="7"),
        Event(event="message", data="line one\nline two", id="7"),
        Event(event="end", data={}, id="7"),
    ]


def test_events_yields_each_event_as_it_arrives_not_when_more_bytes_follow(api):
    # Given a stream that sends one short event, then holds the next until the client has seen the first
    client_saw_first = threading.Event()
    outcome: dict[str, bool] = {}

    def stream(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write(b'event: state\ndata: {"to_state": "RUNNING"}\n\n')
        handler.wfile.flush()
        outcome["first_seen_before_more"] = client_saw_first.wait(10)
        handler.wfile.write(b'event: state\ndata: {"to_state": "SUCCEEDED"}\n\nevent: end\ndata: {}\n\n')
        handler.wfile.flush()
        handler.close_connection = True

    api.plan("GET", "/api/v1/tasks/t-1/events", Answer(action=stream))
    with Client(api.url, api_key="aios_k") as aios:
        seen = []
        for event in aios.events("t-1", read_timeout_s=30):
            seen.append(event.data.get("to_state", event.event))
            client_saw_first.set()
    # Then the first event reached the caller while the server still held the second one
    assert outcome["first_seen_before_more"] is True
    assert seen == ["RUNNING", "SUCCEEDED", "end"]
    assert api.seen[0].headers["Accept"] == "text/event-stream"


def sse(*frames: bytes, hold_s: float = 0.0) -> Callable[[BaseHTTPRequestHandler], None]:
    def write(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()
        handler.wfile.write(b"retry: 3000\n\n" + b"".join(frames))
        handler.wfile.flush()
        time.sleep(hold_s)
        handler.close_connection = True

    return write


def test_a_task_stream_closed_before_its_end_is_resumed_from_the_last_event_id(api):
    # Given a stream the server closes after two events (as at api.sse_max_s), then a second one
    api.plan(
        "GET",
        "/api/v1/tasks/t-1/events",
        Answer(
            action=sse(
                b'id: 11\nevent: state\ndata: {"to_state": "QUEUED"}\n\n',
                b'id: 12\nevent: progress\ndata: {"percent": 50}\n\n',
            )
        ),
        Answer(
            action=sse(
                b'id: 13\nevent: state\ndata: {"to_state": "SUCCEEDED"}\n\n',
                b'event: end\ndata: {"last_event_id": 13}\n\n',
            )
        ),
    )
    with Client(api.url, api_key="aios_k") as aios:
        events = list(aios.events("t-1", after=10))
    # Then the client reconnected once, saying where it was, and yielded every event once, ending at end
    assert [(e.event, e.id) for e in events] == [("state", "11"), ("progress", "12"), ("state", "13"), ("end", "13")]
    first, second = api.requests_to("GET", "/api/v1/tasks/t-1/events")
    assert first.headers["Last-Event-ID"] == "10" and second.headers["Last-Event-ID"] == "12"


def test_a_stream_that_keeps_closing_at_once_gives_up_after_the_retries(api):
    api.plan("GET", "/api/v1/tasks/t-1/events", *(Answer(action=sse()) for _ in range(3)))
    with Client(api.url, api_key="aios_k", retries=2) as aios:
        with pytest.raises(ConnectionFailed, match="keeps breaking"):
            list(aios.events("t-1"))
    assert len(api.requests_to("GET", "/api/v1/tasks/t-1/events")) == 3


def test_run_command_sends_an_idempotency_key_and_its_options(api):
    api.plan(
        "POST",
        "/api/v1/commands",
        Answer(503, {"error": "service_unavailable", "message": "x"}),
        Answer(200, task("SUCCEEDED", result={"exit_code": 0})),
    )
    with Client(api.url, api_key="aios_k") as aios:
        finished = aios.run_command(["echo", "hi"], wait_s=5, env={"A": "1"}, limits={"wall_s": 10})
    assert finished["result"] == {"exit_code": 0}
    first, second = api.requests_to("POST", "/api/v1/commands")
    assert first.headers["Idempotency-Key"] == second.headers["Idempotency-Key"]
    assert second.body == {"argv": ["echo", "hi"], "env": {"A": "1"}, "limits": {"wall_s": 10}, "wait_s": 5}


def test_bulk_sends_the_action_and_the_filter(api):
    api.plan(
        "POST",
        "/api/v1/tasks/bulk",
        Answer(200, {"action": "cancel", "matched": 2, "sample_ids": ["a", "b"], "dry_run": True, "limit": 5}),
    )
    with Client(api.url, api_key="aios_k") as aios:
        outcome = aios.bulk(
            "cancel",
            dry_run=True,
            limit=5,
            state="QUEUED",
            queue="reports",
            created_after=datetime(2030, 1, 1, tzinfo=UTC),
        )
    assert outcome["matched"] == 2
    assert api.seen[0].body == {
        "action": "cancel",
        "dry_run": True,
        "limit": 5,
        "filter": {"state": ["QUEUED"], "queue": "reports", "created_after": "2030-01-01T00:00:00+00:00"},
    }


def test_a_resumed_token_session_refreshes_reports_new_tokens_and_can_close_without_logging_out(api):
    # Given tokens saved from an earlier session, and an API that finds the access token expired
    api.plan(
        "GET",
        "/api/v1/status",
        Answer(401, {"error": "unauthorized", "message": "expired"}),
        Answer(200, {"version": "1"}),
    )
    api.plan("POST", "/api/v1/auth/refresh", Answer(200, {"access_token": "a2"}))
    renewed: list[tuple[str, str | None]] = []
    aios = Client.with_tokens(
        api.url,
        access_token="a1",
        refresh_token="r1",
        on_renew=lambda access, refresh: renewed.append((access, refresh)),
    )
    # When it is used: it refreshes, tells the caller the new tokens, and resends
    assert aios.status() == {"version": "1"}
    assert renewed == [("a2", "r1")] and aios.tokens == ("a2", "r1")
    # When it is closed with logout=False: nothing is revoked (no request at all)
    aios.close(logout=False)
    assert [(s.method, s.path) for s in api.seen] == [
        ("GET", "/api/v1/status"),
        ("POST", "/api/v1/auth/refresh"),
        ("GET", "/api/v1/status"),
    ]


def test_a_resumed_session_whose_refresh_token_expired_raises_unauthorized(api):
    api.plan("GET", "/api/v1/status", Answer(401, {"error": "unauthorized", "message": "expired"}))
    api.plan("POST", "/api/v1/auth/refresh", Answer(401, {"error": "unauthorized", "message": "refresh expired"}))
    aios = Client.with_tokens(api.url, access_token="a1", refresh_token="r1")
    with pytest.raises(Unauthorized, match="refresh expired"):
        aios.status()
    aios.close(logout=False)
    assert len(api.requests_to("POST", "/api/v1/auth/token")) == 0  # no password: no new login


def test_wait_calls_on_change_for_each_new_answer_only(api):
    api.plan(
        "GET",
        "/api/v1/tasks/t-1",
        Answer(200, task("RUNNING", progress=None)),
        Answer(200, task("RUNNING", progress=None)),
        Answer(200, task("RUNNING", progress=50)),
        Answer(200, task("SUCCEEDED", progress=100)),
    )
    changes: list[tuple[str, Any]] = []
    with Client(api.url, api_key="aios_k") as aios:
        aios.wait("t-1", timeout=10, poll_s=0.05, on_change=lambda t: changes.append((t["state"], t["progress"])))
    assert changes == [("RUNNING", None), ("RUNNING", 50), ("SUCCEEDED", 100)]


def test_all_events_sends_its_filters_and_resumes_with_the_cluster_cursor(api):
    api.plan(
        "GET",
        "/api/v1/events",
        Answer(action=sse(b'id: 5:2\nevent: agent\ndata: {"to_status": "OFFLINE"}\n\n')),
        Answer(action=sse(b'id: 6:2\nevent: state\ndata: {"to_state": "RUNNING"}\n\n')),
    )
    with Client(api.url, api_key="aios_k") as aios:
        stream = aios.all_events(types=["task", "agent"], agent="gpu-01@host")
        seen = [(event.event, event.id) for event in itertools.islice(stream, 2)]
        stream.close()
    assert seen == [("agent", "5:2"), ("state", "6:2")]
    first, second = api.requests_to("GET", "/api/v1/events")
    assert "types=task%2Cagent" in first.path and "agent=gpu-01%40host" in first.path
    assert "Last-Event-ID" not in first.headers and second.headers["Last-Event-ID"] == "5:2"
