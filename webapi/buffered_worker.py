"""gunicorn's threaded worker, with every request read in full before a thread serves it.

gunicorn's ``gthread`` worker hands a connection to a thread as soon as it is readable, and the thread
then blocks reading the headers and the body: a client that sends its headers and then trickles the
body, one byte now and then, holds that thread as long as it likes. ``api.threads`` such clients (no
login needed) stop the API for everyone.

:class:`BufferedThreadWorker` reads each request in the worker's poller loop instead, without blocking
and without a thread: the TLS handshake, the headers (up to gunicorn's own limits) and the body (by
``Content-Length``, or chunked up to its last chunk, never more than ``api.max_body_bytes``). Only a
complete request goes to a thread, and gunicorn's parser reads it from the buffer
(:class:`BufferedSocket`), so it still checks everything it checked before. A request not complete
within ``api.request_read_timeout_s`` is answered 408 by the poller; a body announced larger than the
limit 413 before it is sent; connections beyond ``api.max_connections_per_client`` from one address 429.
Slow clients then cost a socket and a few bytes each, the way they do behind a buffering proxy.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import socket
import ssl
import time
from collections import Counter
from functools import partial
from typing import Any

from gunicorn import http
from gunicorn import sock as gsock
from gunicorn.workers.gthread import TConn, ThreadWorker

from aios.errors import (
    AiosError,
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TooManyRequests,
)

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Bytes read from one connection per poller wake-up: a fast sender cannot monopolise the loop.
READ_ROUND_BYTES = 256 * 1024
#: Bytes of unfinished requests one worker process holds at most, in all (at least 4 bodies at the
#: api.max_body_bytes limit): past it, a partial request already larger than SMALL_REQUEST_BYTES is
#: answered 503, so many slow large uploads cannot make the process grow without bound, while small
#: requests (/healthz, a task submission) are still read.
BUFFER_BUDGET_BYTES = 32 * 1024 * 1024
SMALL_REQUEST_BYTES = 64 * 1024
#: Longest line of a chunked body's framing (size and extensions).
MAX_CHUNK_LINE_BYTES = 4096
#: How long a refused connection lingers to read what the client still sends, so that closing it does
#: not reset the connection before the client has read the answer (RFC 9112 section 9.6).
LINGER_S = 2.0
_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class RequestFraming:
    """Where one HTTP/1.x request ends in the bytes received so far; plain logic, fed incrementally.

    It reads only what framing needs (``Content-Length``, ``Transfer-Encoding``, ``Expect``) and leaves
    every other check to gunicorn's parser. :meth:`examine` returns True once the request is complete,
    False while more bytes are needed, and raises an :class:`AiosError` for a request that must be
    refused without reading further.
    """

    def __init__(self, *, max_header_bytes: int, max_body_bytes: int) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        #: True once the headers asked for ``100 Continue`` before sending a body.
        self.expects_continue = False
        self._start = 0
        self._headers_end: int | None = None
        self._scanned = 0
        self._length: int | None = None
        self._chunked = False
        self._pos = 0
        self._phase = "size"
        self._remaining = 0
        self._body_bytes = 0

    def examine(self, data: bytes | bytearray) -> bool:
        if self._headers_end is None and not self._find_headers(data):
            return False
        if self._chunked:
            return self._chunks_complete(data)
        assert self._headers_end is not None and self._length is not None
        return len(data) >= self._headers_end + self._length

    def _find_headers(self, data: bytes | bytearray) -> bool:
        while data.startswith(b"\r\n", self._start):  # empty lines before a request are ignored (RFC 9112 2.2)
            self._start += 2
        end = data.find(b"\r\n\r\n", max(self._start, self._scanned - 3))
        if end < 0:
            self._scanned = len(data)
            if len(data) - self._start > self.max_header_bytes:
                raise HeadersTooLarge(
                    f"the request line and headers are larger than {self.max_header_bytes} "
                    "bytes; send fewer or shorter headers"
                )
            return False
        self._headers_end = self._pos = end + 4
        head = bytes(data[self._start : end])
        if head.count(b"\n") != head.count(b"\r\n") or head.count(b"\r") != head.count(b"\r\n"):
            # A line gunicorn might split where we do not could hide a body length from us.
            raise BadRequest("request lines must end with CRLF; a bare LF or CR is not allowed")
        self._frame(head.split(b"\r\n"))
        return True

    def _frame(self, lines: list[bytes]) -> None:
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        expect = b""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.update(v.strip() for v in value.split(b","))
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b",") if c.strip())
            elif name == b"expect":
                expect = value.lower()
        if codings:
            if lengths or codings[-1] != b"chunked":
                raise BadRequest(
                    "a request body must be framed by Content-Length or by Transfer-Encoding: "
                    "chunked (last), not both and not another coding"
                )
            self._chunked = True
        elif len(lengths) > 1 or any(not v.isdigit() for v in lengths):
            raise BadRequest("Content-Length must be one decimal number of bytes")
        else:
            self._length = int(lengths.pop()) if lengths else 0
            if self._length > self.max_body_bytes:
                raise self._too_large()
        has_body = self._chunked or bool(self._length)
        self.expects_continue = has_body and expect == b"100-continue" and lines[0].endswith(b"HTTP/1.1")

    def _chunks_complete(self, data: bytes | bytearray) -> bool:
        while True:
            if self._phase == "data":
                taken = min(self._remaining, len(data) - self._pos)
                self._pos += taken
                self._remaining -= taken
                if self._remaining:
                    return False
                self._phase = "crlf"
            if self._phase == "crlf":
                if len(data) < self._pos + 2:
                    return False
                if data[self._pos : self._pos + 2] != b"\r\n":
                    raise BadRequest("a chunk of the request body does not end with CRLF")
                self._pos += 2
                self._phase = "size"
            eol = data.find(b"\r\n", self._pos)
            if eol < 0:
                limit = MAX_CHUNK_LINE_BYTES if self._phase == "size" else self.max_header_bytes
                if len(data) - self._pos > limit:
                    raise BadRequest("a chunk size line or trailer of the request body is too long")
                return False
            line, self._pos = bytes(data[self._pos : eol]), eol + 2
            if self._phase == "trailer":
                if not line:
                    return True
                continue
            size = line.partition(b";")[0].strip()
            if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
                raise BadRequest("a chunk size of the request body is not a hexadecimal number")
            self._remaining = int(size, 16)
            self._body_bytes += self._remaining
            if self._body_bytes > self.max_body_bytes:
                raise self._too_large()
            self._phase = "data" if self._remaining else "trailer"

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body is larger than the limit of {self.max_body_bytes} bytes (api.max_body_bytes)"
        )


def error_bytes(error: AiosError) -> bytes:
    """A whole HTTP/1.1 answer for a request refused by the poller: the app's JSON error shape."""
    body = json.dumps(error.to_dict()).encode()
    head = [
        f"HTTP/1.1 {error.status} {_REASONS.get(error.status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        *(f"{name}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class BufferedSocket:
    """A connection's socket whose ``recv`` returns the bytes the poller already read first.

    Every other call goes to the real socket (or its TLS wrapper). A thread does not wait for a client:
    should gunicorn's parser ever ask for bytes past the buffered request, it waits until ``deadline``
    at most (set when the request goes to a thread), however slowly the bytes come. The ``100
    Continue`` the poller already sent is not sent twice.
    """

    def __init__(self, raw: socket.socket) -> None:
        self.raw = raw
        self.buffer = bytearray()
        self.deadline = 0.0
        self.continue_sent = False

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.buffer:
            data = bytes(self.buffer[:size])
            del self.buffer[:size]
            return data
        if self.raw.gettimeout() is None and not _tls_pending(self.raw):
            with selectors.DefaultSelector() as selector:
                selector.register(self.raw, selectors.EVENT_READ)
                if not selector.select(max(0.0, self.deadline - time.monotonic())):
                    raise TimeoutError("the request was not complete within api.request_read_timeout_s")
        return self.raw.recv(size, flags)

    def send(self, data: bytes, flags: int = 0) -> int:
        return len(data) if self._continue_again(data) else self.raw.send(data, flags)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if not self._continue_again(data):
            self.raw.sendall(data, flags)

    def _continue_again(self, data: bytes) -> bool:
        """True (once) for gunicorn's ``100 Continue`` when the poller has sent it already."""
        if self.continue_sent and bytes(data) == CONTINUE:
            self.continue_sent = False
            return True
        return False

    def fileno(self) -> int:
        return self.raw.fileno()

    def __getattr__(self, name: str) -> Any:
        # setblocking, settimeout, gettimeout, shutdown, close, getpeername, getsockname, sendfile, ...
        return getattr(self.raw, name)


def _tls_pending(raw: socket.socket) -> int:
    return raw.pending() if isinstance(raw, ssl.SSLSocket) else 0


class BufferedConn(TConn):
    """gunicorn's connection, on a :class:`BufferedSocket` whose TLS handshake the poller has done."""

    initialized: bool  # set by gunicorn's TConn.__init__

    def __init__(self, cfg: Any, sock: BufferedSocket, client: Any, server: Any, release: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.release = release
        self.reading: _Reading | None = None
        #: Counted against ``api.max_connections_per_client`` until released (None then).
        self.address: str | None = client[0] if isinstance(client, tuple) else str(client)

    def init(self) -> None:
        if self.initialized:
            return
        self.initialized = True
        self.sock.setblocking(True)
        self.parser = http.get_parser(self.cfg, self.sock, self.client)

    def close(self, graceful: bool = False) -> None:
        self.release(self)
        super().close(graceful)


class _Reading:
    """The poller's state for one connection whose request is not complete yet."""

    def __init__(
        self, framing: RequestFraming, deadline: float, *, handshaking: bool, refusal: AiosError | None = None
    ) -> None:
        self.framing = framing
        self.deadline = deadline
        self.handshaking = handshaking
        self.refusal = refusal
        self.lingering = False
        self.events = 0
        #: Bytes of this request counted in the worker's ``buffered_bytes``.
        self.counted = 0


class BufferedThreadWorker(ThreadWorker):
    """``gthread`` whose poller reads whole requests; threads only run the app (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        api = self.app.settings.api
        self.read_timeout_s = api.request_read_timeout_s
        self.max_body_bytes = api.max_body_bytes
        self.max_per_client = api.max_connections_per_client
        # gunicorn's own cap on the request line plus header fields (Request.max_buffer_headers).
        self.max_header_bytes = (
            self.cfg.limit_request_line
            + 2
            + self.cfg.limit_request_fields * (self.cfg.limit_request_field_size + 2)
            + 4
        )
        self.per_client: Counter[str] = Counter()
        self.reading: set[BufferedConn] = set()
        self.buffer_budget = max(BUFFER_BUDGET_BYTES, 4 * self.max_body_bytes)
        self.buffered_bytes = 0
        self.tls_context: ssl.SSLContext | None = None

    def init_process(self) -> None:
        if self.cfg.is_ssl:
            self.tls_context = gsock.ssl_context(self.cfg)
        super().init_process()

    def handle_quit(self, sig: int, frame: Any) -> None:
        """SIGQUIT/SIGINT is gunicorn's *quick* shutdown: leave now, without joining request threads.

        gunicorn's own handler raises ``SystemExit`` from the signal handler, and the interpreter then
        joins every thread of the pool at exit; a thread blocked there, or a second signal arriving
        inside that join (Ctrl-C reaches the worker and then the master's SIGQUIT follows), left the
        worker running after its master had gone. Nothing durable is lost by leaving at once: an
        unfinished request's transaction rolls back, and a 202 is only ever sent after its commit.
        """
        self.alive = False
        self.cfg.worker_int(self)
        os._exit(0)  # log handlers flush every record already; flushing here could wait on another thread

    # ------------------------------------------------------------------ connections in and out

    def accept(self, listener: socket.socket) -> None:
        try:
            raw, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        raw.setblocking(False)
        if self.tls_context is not None:
            raw = self.tls_context.wrap_socket(
                raw, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=self.cfg.suppress_ragged_eofs
            )
        conn = BufferedConn(self.cfg, BufferedSocket(raw), client, listener.getsockname(), self.release)
        address = conn.address or ""
        self.per_client[address] += 1
        refusal = None
        if self.max_per_client and self.per_client[address] > self.max_per_client:
            refusal = TooManyRequests(
                f"more than {self.max_per_client} open connections from {address} "
                "(api.max_connections_per_client); reuse connections or close some",
                retry_after_s=1,
            )
        self.start_reading(conn, handshaking=self.tls_context is not None, refusal=refusal)

    def release(self, conn: BufferedConn) -> None:
        """Forget a closing connection's count against its client address (once)."""
        address, conn.address = conn.address, None
        if address is not None:
            self.per_client[address] -= 1
            if self.per_client[address] <= 0:
                del self.per_client[address]

    def on_client_socket_readable(self, conn: BufferedConn, client: Any) -> None:
        """A kept-alive connection's next request starts: read it whole before a thread serves it."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.start_reading(conn)

    def finish_request(self, conn: BufferedConn, fs: Any) -> None:
        kept = not fs.cancelled() and fs.exception() is None and fs.result() is True
        if kept and self.alive and conn.parser is not None:
            # Bytes of the next request already read (pipelining) no longer make the socket readable.
            ahead = conn.parser.unreader.take_buffered()
            if ahead or conn.sock.buffer or _tls_pending(conn.sock.raw):
                conn.sock.buffer[:0] = ahead
                self.start_reading(conn)
                return
        super().finish_request(conn, fs)

    # ------------------------------------------------------------------ the poller's reading

    def start_reading(self, conn: BufferedConn, *, handshaking: bool = False, refusal: AiosError | None = None) -> None:
        framing = RequestFraming(max_header_bytes=self.max_header_bytes, max_body_bytes=self.max_body_bytes)
        conn.reading = _Reading(
            framing, time.monotonic() + self.read_timeout_s, handshaking=handshaking, refusal=refusal
        )
        conn.sock.setblocking(False)
        self.reading.add(conn)
        self.advance(conn)

    def advance(self, conn: BufferedConn, _fileobj: Any = None) -> None:
        state = conn.reading
        assert state is not None
        raw = conn.sock.raw
        try:
            if state.lingering:
                if not self._receive(conn, keep=False):
                    self._close(conn)
                return
            if state.handshaking:
                raw.do_handshake()
                state.handshaking = False
            if state.refusal is not None:
                self.refuse(conn, state.refusal)
                return
            open_ = self._receive(conn, keep=True)
            self._count(conn)
            if state.framing.examine(conn.sock.buffer):
                self._dispatch(conn)
            elif self.buffered_bytes > self.buffer_budget and state.counted > SMALL_REQUEST_BYTES:
                raise ServiceUnavailable(
                    f"this API process is receiving more than {self.buffer_budget} bytes of unfinished requests; retry",
                    headers={"Retry-After": "1"},
                )
            elif not open_:
                self._close(conn)
            else:
                if state.framing.expects_continue and not conn.sock.continue_sent:
                    conn.sock.continue_sent = raw.send(CONTINUE) == len(CONTINUE)
                self._watch(conn, selectors.EVENT_READ)
        except ssl.SSLWantReadError:
            self._watch(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._watch(conn, selectors.EVENT_WRITE)
        except AiosError as error:
            self.refuse(conn, error)
        except OSError:  # reset, or a failed TLS handshake: nothing to answer
            self._close(conn)

    def _receive(self, conn: BufferedConn, *, keep: bool) -> bool:
        """Read what the socket has now (one round); False once the client has closed its side."""
        raw, received = conn.sock.raw, 0
        while received < READ_ROUND_BYTES or _tls_pending(raw):
            try:
                data = raw.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError):
                return True
            if not data:
                return False
            received += len(data)
            if keep:
                conn.sock.buffer += data
        return True

    def _count(self, conn: BufferedConn) -> None:
        state = conn.reading
        assert state is not None
        self.buffered_bytes += len(conn.sock.buffer) - state.counted
        state.counted = len(conn.sock.buffer)

    def _watch(self, conn: BufferedConn, events: int) -> None:
        assert conn.reading is not None
        if conn.reading.events == events:
            return
        if conn.reading.events:
            self.poller.modify(conn.sock, events, partial(self.advance, conn))
        else:
            self.poller.register(conn.sock, events, partial(self.advance, conn))
        conn.reading.events = events

    def _unwatch(self, conn: BufferedConn) -> None:
        self.reading.discard(conn)
        if conn.reading is not None:
            self.buffered_bytes -= conn.reading.counted
            conn.reading.counted = 0
        if conn.reading is not None and conn.reading.events:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
        conn.reading = None

    def _dispatch(self, conn: BufferedConn) -> None:
        self._unwatch(conn)
        conn.data_ready = True  # gunicorn's thread must not wait for the socket: the request is buffered
        conn.sock.deadline = time.monotonic() + self.read_timeout_s
        self.enqueue_req(conn)

    def refuse(self, conn: BufferedConn, error: AiosError) -> None:
        """Answer ``error`` from the poller and close, lingering briefly so the client reads the answer."""
        state = conn.reading
        assert state is not None
        try:
            conn.sock.raw.send(error_bytes(error))
            conn.sock.raw.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            self._close(conn)
            return
        conn.sock.buffer.clear()
        self._count(conn)
        state.refusal, state.lingering = None, True
        state.deadline = time.monotonic() + LINGER_S
        self._watch(conn, selectors.EVENT_READ)

    def _close(self, conn: BufferedConn) -> None:
        self._unwatch(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Also time out the requests the poller is reading: 408 if part of one came, else just close."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.reading if c.reading is not None]:
            state = conn.reading
            assert state is not None  # filtered above
            if state.deadline <= now or (not self.alive and not conn.sock.buffer):
                if state.lingering or state.handshaking or not conn.sock.buffer:
                    self._close(conn)
                else:
                    self.refuse(
                        conn,
                        RequestTimeout(
                            f"the request was not complete within {self.read_timeout_s} s "
                            "(api.request_read_timeout_s); send it faster or put a buffering proxy in front"
                        ),
                    )
