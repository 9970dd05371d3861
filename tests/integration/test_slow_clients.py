"""Slow clients cannot starve `aios api` (issue 15, item 3).

Before: 8-10 connections sending headers and then trickling a body (``Content-Length: 100000``, one
byte now and then) held every gunicorn thread and /healthz timed out for everyone. Each test here
starts a real ``aios api`` process (one gunicorn worker of ``api.threads`` threads) and speaks raw
HTTP/1.1 on sockets, the way the probe did.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

import pytest
import requests

from tests.conftest import wait_for
from tests.integration.test_tls import certificate  # noqa: F401 - the fixture, shared with the TLS tests

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLOW_HEAD = (
    b"POST /api/v1/auth/token HTTP/1.1\r\nHost: aios\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n"
)


def connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=10)


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP answer: (status, headers, body), reading no byte past it.

    Pipelined answers may arrive in one segment: the next answer's bytes stay on the socket for the
    next call (a loaded machine delivers both at once; reading past the first lost the second).
    """
    data = b""
    while True:
        ahead = sock.recv(65536, socket.MSG_PEEK)
        assert ahead, f"connection closed before an answer; got {data!r}"
        end = (data + ahead).find(b"\r\n\r\n")
        if end >= 0:
            data += recv_exactly(sock, end + 4 - len(data))
            break
        data += recv_exactly(sock, len(ahead))
    lines = data[:-4].decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    body = recv_exactly(sock, int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed in the middle of an answer"
        data += chunk
    return data


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


@contextmanager
def trickling(url: str, count: int, interval_s: float = 0.5) -> Iterator[list[socket.socket]]:
    """``count`` connections that send headers announcing 100000 bytes, then one byte every ``interval_s``."""
    sockets = [connect(url) for _ in range(count)]
    for sock in sockets:
        sock.sendall(SLOW_HEAD + b"{")
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(interval_s):
            for sock in sockets:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield sockets
    finally:
        stop.set()
        thread.join()
        for sock in sockets:
            sock.close()


def test_fifty_trickling_bodies_leave_healthz_answering_within_a_second(start_api):
    # Given an API (4 threads) whose read timeout is longer than the whole test, so that nothing is
    # rescued by a timeout: only a server that keeps slow clients off its threads passes
    api = start_api(env={"AIOS_API__REQUEST_READ_TIMEOUT_S": "120"})
    # When 50 clients send headers and then a byte of body every 0.5 s
    with trickling(api.url, 50) as slow:
        time.sleep(1.5)
        # Then /healthz answers every time, each within a second, for as long as they trickle
        elapsed = []
        for _ in range(12):
            started = time.monotonic()
            response = requests.get(f"{api.url}/healthz", timeout=10)
            elapsed.append(time.monotonic() - started)
            assert response.status_code == 200
            time.sleep(0.5)
        assert max(elapsed) < 1.0, elapsed
        # And the slow clients are still connected, waiting (they were not simply dropped)
        for sock in slow:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)


def test_a_body_still_incomplete_after_the_read_timeout_is_answered_408_and_closed(start_api):
    # Given an API with a 2 s request read timeout
    api = start_api(env={"AIOS_API__REQUEST_READ_TIMEOUT_S": "2"})
    # When a client sends headers and trickles its body
    with trickling(api.url, 1, interval_s=0.3) as (sock,):
        started = time.monotonic()
        status, headers, body = read_answer(sock)
        waited = time.monotonic() - started
        # Then, after the timeout and not before, 408 request_timeout in the API's JSON error shape
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "request_timeout"
        assert "api.request_read_timeout_s" in json.loads(body)["message"]
        assert waited > 1.0
        # And the server closes the connection
        assert closed_by_server(sock)
    # And the API still answers
    assert requests.get(f"{api.url}/healthz", timeout=10).status_code == 200


def test_connections_beyond_the_per_client_cap_are_answered_429_and_closed(start_api):
    # Given an API that allows 5 open connections per client address
    api = start_api(env={"AIOS_API__MAX_CONNECTIONS_PER_CLIENT": "5"})
    idle = [connect(api.url) for _ in range(5)]
    try:
        # When a sixth connection from the same address sends a request
        extra = connect(api.url)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: aios\r\n\r\n")
        status, headers, body = read_answer(extra)
        # Then 429 too_many_requests naming the setting, and the connection is closed
        assert status == 429
        assert json.loads(body)["error"] == "too_many_requests"
        assert "api.max_connections_per_client" in json.loads(body)["message"]
        assert headers["retry-after"] == "1"
        assert closed_by_server(extra)
        extra.close()
    finally:
        for sock in idle:
            sock.close()

    # And once they are closed, the same address is served again
    def served() -> bool:
        return requests.get(f"{api.url}/healthz", timeout=10).status_code == 200

    wait_for(served, timeout=10, interval=0.2, what="/healthz after the idle connections closed")


def test_a_body_announced_over_the_limit_is_answered_413_before_it_is_sent(start_api, stack):
    # Given the API's body limit
    api = start_api()
    limit = stack.settings.api.max_body_bytes
    # When a client announces a larger body and waits for 100 Continue
    with connect(api.url) as sock:
        sock.sendall(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: aios\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (limit + 1)
        )
        status, _headers, body = read_answer(sock)
    # Then 413 payload_too_large, naming the limit, without the body ever being sent
    assert status == 413
    assert json.loads(body)["error"] == "payload_too_large"
    assert str(limit) in json.loads(body)["message"]


def test_unfinished_large_bodies_past_the_process_budget_are_answered_503_and_small_requests_still_served(
    start_api, stack
):
    from webapi.buffered_worker import BUFFER_BUDGET_BYTES

    # Given an API process and 48 clients that each send all but the last byte of a body at the limit
    # (48 MiB in all, past the 32 MiB a process holds of unfinished requests)
    api = start_api(env={"AIOS_API__REQUEST_READ_TIMEOUT_S": "120"})
    limit = stack.settings.api.max_body_bytes
    head = b"POST /api/v1/tasks HTTP/1.1\r\nHost: aios\r\nContent-Length: %d\r\n\r\n" % limit
    count = BUFFER_BUDGET_BYTES // limit + 16
    sockets = [connect(api.url) for _ in range(count)]
    try:
        for sock in sockets:
            try:
                sock.sendall(head + b"x" * (limit - 1))
            except OSError:
                pass  # already refused and closed
        # Then the ones past the budget are answered 503 and the others still wait
        time.sleep(1)
        refused = []
        for sock in sockets:
            sock.setblocking(False)
            try:
                refused.append(sock.recv(64).startswith(b"HTTP/1.1 503 "))
            except BlockingIOError:
                refused.append(False)
        assert 0 < sum(refused) <= count // 2, refused
        # And a small request is served meanwhile
        assert requests.get(f"{api.url}/healthz", timeout=10).status_code == 200
    finally:
        for sock in sockets:
            sock.close()


def test_chunked_pipelined_and_kept_alive_requests_with_bodies_are_still_served(start_api, admin, queue):
    api = start_api()
    body = json.dumps({"type": "echo", "parameters": {"n": 1}, "queue": queue}).encode()
    head = (
        b"POST /api/v1/tasks HTTP/1.1\r\nHost: aios\r\nContent-Type: application/json\r\n"
        b"X-API-Key: " + admin.key.encode() + b"\r\n"
    )
    with connect(api.url) as sock:
        # Given a chunked body sent in two chunks, a byte apart in time
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (10, body[:10]))
        time.sleep(0.3)
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - 10, body[10:]))
        # Then the task is accepted
        status, _headers, answer = read_answer(sock)
        assert status == 202, answer
        # Given two requests in one write on the same kept-alive connection, the first with a body
        sock.sendall(
            head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body) + b"GET /healthz HTTP/1.1\r\nHost: aios\r\n\r\n"
        )
        # Then both are answered, in order
        assert read_answer(sock)[0] == 202
        assert read_answer(sock)[0] == 200
        # Given a body sent after 100 Continue, on the same connection
        sock.sendall(head + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = sock.recv(len(b"HTTP/1.1 100 Continue\r\n\r\n"))
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        # Then the task is accepted, with no second 100 Continue before the answer
        assert read_answer(sock)[0] == 202
    # And an ordinary client on a keep-alive session is served as before
    with requests.Session() as session:
        for _ in range(3):
            answer = session.post(
                f"{api.url}/api/v1/tasks",
                data=body,
                timeout=10,
                headers={"X-API-Key": admin.key, "Content-Type": "application/json"},
            )
            assert answer.status_code == 202, answer.text


def test_gunicorns_request_line_and_header_limits_still_apply(start_api):
    # Given requests past gunicorn's limits (limit_request_line, limit_request_fields) and a header
    # block larger than gunicorn would ever buffer
    api = start_api()
    cases = {
        "a request line over 8190 bytes": (b"GET /healthz?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: aios\r\n\r\n", 414),
        "101 header fields": (
            b"GET /healthz HTTP/1.1\r\nHost: aios\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
            431,
        ),
        "an endless header block": (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"b" * 900_000, 431),
    }
    for what, (request, expected) in cases.items():
        with connect(api.url) as sock:
            # When each is sent / Then it is refused: by gunicorn's parser (its own text answer) when the
            # block is complete, by the poller (JSON) when it never ends
            sock.sendall(request)
            status, headers, _body = read_answer(sock)
            assert status == expected, what
            assert (headers.get("content-type") == "application/json") == (what == "an endless header block"), what


def test_stalled_tls_handshakes_and_trickling_tls_bodies_leave_https_answering(start_api, certificate, admin, queue):  # noqa: F811 - the fixture imported above
    # Given the API serving HTTPS (the poller does the TLS handshake too)
    cert, _key = certificate
    api = start_api(name="api-tls", env={"AIOS_API__REQUEST_READ_TIMEOUT_S": "120"}, tls=certificate)
    port = urlparse(api.url).port
    context = ssl.create_default_context(cafile=str(cert))
    stalled: list[socket.socket] = []
    slow: list[ssl.SSLSocket] = []
    try:
        # When 20 clients open TCP and never start TLS, and 10 finish TLS and trickle a body
        stalled = [connect(f"http://127.0.0.1:{port}") for _ in range(20)]
        for _ in range(10):
            sock = context.wrap_socket(connect(f"http://127.0.0.1:{port}"), server_hostname="127.0.0.1")
            sock.sendall(SLOW_HEAD + b"{")
            slow.append(sock)
        for _ in range(6):
            time.sleep(0.5)
            for sock in slow:
                sock.sendall(b" ")
            # Then HTTPS /healthz answers within a second each time
            started = time.monotonic()
            assert requests.get(f"{api.url}/healthz", verify=str(cert), timeout=10).status_code == 200
            assert time.monotonic() - started < 1.0
        # And a kept-alive HTTPS session posts bodies as before
        body = json.dumps({"type": "echo", "parameters": {"n": 1}, "queue": queue})
        with requests.Session() as session:
            for _ in range(3):
                answer = session.post(
                    f"{api.url}/api/v1/tasks",
                    data=body,
                    verify=str(cert),
                    timeout=10,
                    headers={"X-API-Key": admin.key, "Content-Type": "application/json"},
                )
                assert answer.status_code == 202, answer.text
    finally:
        for sock in [*stalled, *slow]:
            sock.close()
