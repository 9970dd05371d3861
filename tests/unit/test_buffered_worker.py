"""The API worker's request framing and socket wrapper (webapi/buffered_worker.py): plain logic, real sockets."""

from __future__ import annotations

import json
import socket
import time

import pytest

from aios.errors import BadRequest, HeadersTooLarge, PayloadTooLarge, RequestTimeout
from webapi.buffered_worker import CONTINUE, BufferedSocket, RequestFraming, error_bytes


def framing(max_body_bytes: int = 1000) -> RequestFraming:
    return RequestFraming(max_header_bytes=200, max_body_bytes=max_body_bytes)


def fed_byte_by_byte(request: bytes, frame: RequestFraming) -> int:
    """How many bytes of ``request`` arrive before the framing calls it complete."""
    for size in range(1, len(request) + 1):
        if frame.examine(request[:size]):
            return size
    raise AssertionError("never complete")


def test_a_request_without_a_body_is_complete_at_the_end_of_its_headers():
    request = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    assert fed_byte_by_byte(request, framing()) == len(request)


def test_a_content_length_body_is_complete_at_its_last_byte_and_not_before():
    request = b"POST /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    assert fed_byte_by_byte(request + b"GET / HTTP/1.1\r\n", framing()) == len(request)


def test_a_chunked_body_is_complete_after_its_last_chunk_and_trailers():
    request = b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
    assert fed_byte_by_byte(request, framing()) == len(request)


def test_empty_lines_before_a_request_are_skipped():
    request = b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    assert fed_byte_by_byte(request, framing()) == len(request)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",
        b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"a" * 1000 + b"\r\n2\r\n",
    ],
)
def test_a_body_over_the_limit_is_refused_as_soon_as_it_is_announced(request_bytes):
    with pytest.raises(PayloadTooLarge, match="api.max_body_bytes"):
        framing().examine(request_bytes)


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: gzip",
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: -5",
    ],
)
def test_a_body_whose_end_cannot_be_told_is_a_400(headers):
    with pytest.raises(BadRequest):
        framing().examine(b"POST /x HTTP/1.1\r\n" + headers + b"\r\n\r\n")


def test_a_bad_chunk_size_is_a_400():
    with pytest.raises(BadRequest, match="hexadecimal"):
        framing().examine(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")


def test_headers_that_never_end_are_refused_past_the_header_limit():
    frame = framing()
    assert not frame.examine(b"GET / HTTP/1.1\r\nX: " + b"a" * 150)
    with pytest.raises(HeadersTooLarge):
        frame.examine(b"GET / HTTP/1.1\r\nX: " + b"a" * 250)


def test_expect_100_continue_is_noticed_only_for_an_http_1_1_request_with_a_body():
    cases = {
        b"POST /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n": True,
        b"POST /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n": False,
        b"GET /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n": False,
    }
    for request, expected in cases.items():
        frame = framing()
        frame.examine(request)
        assert frame.expects_continue is expected, request


def test_a_refusal_is_a_whole_http_answer_with_the_json_error_shape():
    answer = error_bytes(RequestTimeout("too slow"))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in head and b"Content-Length: %d" % len(body) in head
    assert json.loads(body) == {"error": "request_timeout", "message": "too slow"}


@pytest.mark.parametrize(
    "head",
    [
        b"POST /x HTTP/1.1\r\nHost: a\nContent-Length: 5\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\rContent-Length: 5\r\n\r\n",
    ],
)
def test_a_bare_lf_or_cr_in_the_headers_is_a_400_since_it_could_hide_a_body_length(head):
    with pytest.raises(BadRequest, match="CRLF"):
        framing().examine(head)


def test_a_buffered_socket_replays_the_request_then_waits_no_longer_than_its_deadline():
    # Given a socket whose request the poller read, handed to a thread with a deadline 0.3 s away
    server, client = socket.socketpair()
    with server, client:
        wrapped = BufferedSocket(server)
        wrapped.buffer += b"GET / HTTP/1.1\r\n\r\n"
        wrapped.deadline = time.monotonic() + 0.3
        # When the parser reads / Then it gets the buffered bytes first, then what the socket has
        assert wrapped.recv(4) == b"GET "
        assert wrapped.recv(100) == b"/ HTTP/1.1\r\n\r\n"
        client.sendall(b"more")
        assert wrapped.recv(100) == b"more"
        # And once nothing comes, the thread is let go at the deadline instead of waiting for the client
        with pytest.raises(TimeoutError):
            wrapped.recv(100)


def test_a_buffered_socket_does_not_send_100_continue_twice():
    server, client = socket.socketpair()
    with server, client:
        wrapped = BufferedSocket(server)
        wrapped.continue_sent = True
        wrapped.send(CONTINUE)
        wrapped.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        assert client.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
