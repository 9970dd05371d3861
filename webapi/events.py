"""Live events as Server-Sent Events: one task's timeline, or every task and agent change.

* ``GET /api/v1/tasks/<id>/events`` replays the task's timeline (after ``Last-Event-ID`` or
  ``?after=``), then follows it, and ends by itself once the task is in a final state: ``event: state``
  for each state change, ``event: progress`` for each progress report, ``event: note`` for other
  notes, then ``event: end``. The ``id:`` of each event is its ``task_events`` id.
* ``GET /api/v1/events`` follows every change from now on (or after ``Last-Event-ID``/``?after=``):
  task events as above plus ``event: agent`` for agent status changes; filters ``types``, ``state``,
  ``type``, ``agent`` (aios.tasks.events.FeedFilter). ``id:`` is ``<task_event_id>:<agent_event_id>``.

Both poll the database every :data:`POLL_S` (aios.tasks.events; no connection held in between), send a
comment every :data:`HEARTBEAT_S` of silence so proxies keep the connection, re-check the caller's
credentials every :data:`REAUTH_S` (a revoked key or disabled user stops its streams), and close after
``api.sse_max_s``; a client reconnecting with ``Last-Event-ID`` misses nothing and gets nothing twice.

Each open stream holds one gunicorn thread for its whole life, so a process serves at most
``min(api.sse_max_streams, api.threads - 1)`` streams (fewer while command waits hold threads: they
share the budget of :mod:`webapi.holds`) and answers 503 beyond: streams never take the thread that
other requests need. One user holds at most ``api.sse_max_streams_per_principal`` streams across all
API processes (429 beyond), so one viewer cannot take every slot. The after-request hooks (request id,
metrics, audit, security headers) only touch the headers, which are sent before the body, so they do
not hold the stream up.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context
from sqlalchemy.exc import SQLAlchemyError

from aios.config import Settings
from aios.db import session_scope
from aios.errors import AiosError, ServiceUnavailable
from aios.security.roles import ADMIN, OPERATOR, VIEWER
from aios.tasks.actions import get_task
from aios.tasks.events import ClusterFeed, Cursor, FeedFilter, TaskFeed, latest_cursor, parse_event_id
from webapi.context import ctx
from webapi.holds import STREAM, WAIT, Lease, budget_limit, hold, thread_budget
from webapi.security import authenticate, current_principal, policy

logger = logging.getLogger(__name__)

bp = Blueprint("events", __name__)

#: Seconds between two database polls of one stream.
POLL_S = 0.25
#: A comment line after this many seconds without an event (proxies close idle connections).
HEARTBEAT_S = 15.0
#: The caller's key or token is checked again this often while its stream is open.
REAUTH_S = 30.0
#: After a failed poll (database unreachable), wait this long before the next.
ERROR_BACKOFF_S = 2.0
#: What the stream tells EventSource clients to wait before reconnecting (the ``retry:`` field).
RETRY_MS = 3000
STREAM_ROLES = frozenset({VIEWER, OPERATOR, ADMIN})
#: A stream's per-principal lease lives this long unless renewed (it is renewed at each re-check of
#: the credentials, every REAUTH_S); a process killed with its streams open frees them within it.
LEASE_TTL_S = 3 * REAUTH_S


def stream_limit(settings: Settings) -> int:
    return max(0, min(settings.api.sse_max_streams, budget_limit(settings)))


def take_stream_slot(settings: Settings) -> tuple[Callable[[], None], Lease]:
    """A thread of this process and the caller's per-principal lease for one stream, or 503/429."""
    budget = thread_budget(settings)
    release_thread = budget.take(STREAM, settings.api.sse_max_streams)
    if release_thread is None:
        raise ServiceUnavailable(
            f"this API process already holds {budget.held[STREAM]} event streams and {budget.held[WAIT]} "
            f"command waits, its limit (min(api.sse_max_streams, api.threads - 1) = {stream_limit(settings)} "
            f"streams, api.threads - 1 = {budget.limit} in all); retry later",
            headers={"Retry-After": "5"},
        )
    try:
        lease = hold(
            STREAM,
            current_principal(),
            settings.api.sse_max_streams_per_principal,
            LEASE_TTL_S,
            setting="api.sse_max_streams_per_principal",
        )
    except BaseException:
        release_thread()
        raise
    return release_thread, lease


def frame(event: str, data: Any, event_id: str | None = None) -> str:
    """One SSE message; the JSON is on one line (json.dumps escapes newlines), so it is one ``data:`` line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


def _client_gone(sock: Any) -> bool:
    """True once the client closed its end (gunicorn hands us its socket): the slot is freed at once
    instead of at the next write. Unknown (TLS, another server) counts as still there."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError, ValueError):
        return False
    except OSError:
        return True  # reset by peer


def _still_allowed() -> bool:
    try:
        return authenticate().role in STREAM_ROLES
    except AiosError:
        return False


Poll = Callable[[], tuple[list[str], bool]]


def _run(settings: Settings, poll: Poll, release: Callable[[], None], lease: Lease) -> Iterator[str]:
    """Poll until ``poll`` says done, the stream's time is up, or its caller lost the right to it."""
    sock = request.environ.get("gunicorn.socket")
    try:
        yield f"retry: {RETRY_MS}\n\n"  # also sends the headers at once
        started = last_sent = last_auth = time.monotonic()
        deadline = started + settings.api.sse_max_s
        while True:
            wait = POLL_S
            try:
                frames, done = poll()
            except SQLAlchemyError:
                logger.warning("event stream poll failed; trying again in %.0f s", ERROR_BACKOFF_S, exc_info=True)
                frames, done, wait = [": database unavailable, retrying\n\n"], False, ERROR_BACKOFF_S
            yield from frames
            now = time.monotonic()
            if frames:
                last_sent = now
            if done:
                return
            if _client_gone(sock):
                return
            if now >= deadline:
                yield ": this stream reached api.sse_max_s; reconnect with Last-Event-ID\n\n"
                return
            if now - last_auth >= REAUTH_S:
                if not _still_allowed():
                    logger.info("event stream closed: its credentials are no longer valid")
                    return
                try:
                    lease.renew()
                except SQLAlchemyError:
                    logger.warning("event stream could not renew its lease; trying at the next check", exc_info=True)
                last_auth = now
            if now - last_sent >= HEARTBEAT_S:
                yield ": keepalive\n\n"
                last_sent = now
            time.sleep(max(0.0, min(wait, deadline - now)))
    finally:
        release()


def _respond(settings: Settings, poll: Poll) -> Response:
    release_thread, lease = take_stream_slot(settings)

    def release() -> None:
        release_thread()
        lease.release()

    try:
        response = Response(stream_with_context(_run(settings, poll, release, lease)), mimetype="text/event-stream")
    except BaseException:
        release()
        raise
    # The generator's own finally releases the slot once it ran; this covers a response closed unread.
    response.call_on_close(release)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


@bp.get("/api/v1/tasks/<task_id>/events")
@policy(VIEWER, OPERATOR)
def task_events(task_id: str) -> Response:
    settings = ctx().settings
    after = parse_event_id(request.headers.get("Last-Event-ID"), field="Last-Event-ID")
    if after is None:
        after = parse_event_id(request.args.get("after"), field="after") or 0
    with session_scope(settings.database) as session:
        get_task(session, task_id)  # 404 as JSON, before any stream starts
    feed = TaskFeed(settings, task_id, after)

    def poll() -> tuple[list[str], bool]:
        frames = [frame(event.kind, event.data, str(event.id)) for event in feed.poll()]
        if feed.ended:
            frames.append(frame("end", {"task_id": task_id, "last_event_id": feed.last_id}))
        return frames, feed.ended

    return _respond(settings, poll)


@bp.get("/api/v1/events")
@policy(VIEWER, OPERATOR)
def cluster_events() -> Response:
    settings = ctx().settings
    args = request.args
    where = FeedFilter.parse(
        types=args.get("types"), state=args.get("state"), type=args.get("type"), agent=args.get("agent")
    )
    cursor = Cursor.parse(request.headers.get("Last-Event-ID"), field="Last-Event-ID") or Cursor.parse(
        args.get("after"), field="after"
    )
    if cursor is None:
        with session_scope(settings.database) as session:
            cursor = latest_cursor(session)
    feed = ClusterFeed(settings, cursor, where)

    def poll() -> tuple[list[str], bool]:
        return [frame(event.kind, event.data, position.encode()) for event, position in feed.poll()], False

    return _respond(settings, poll)
