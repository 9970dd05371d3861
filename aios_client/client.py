"""A Python client of the AIOS REST API (``/api/v1``), on ``requests``.

::

    from aios_client.client import Client

    with Client("https://aios.example.com", api_key="aios_...") as aios:
        task = aios.submit("sleep", {"seconds": 2}, priority=9)
        print(aios.result(task["id"], timeout=60))

What it promises:

* **One exception per error code.** Every error answer (``{"error", "message", "field"?}``) is raised
  as a subclass of :class:`AiosError` chosen by its ``error`` code (:class:`ValidationFailed`,
  :class:`NotFound`, :class:`RateLimited`, ...); an unknown code falls back to the class of its HTTP
  status, then to :class:`AiosError`, so ``except NotFound`` also catches a newer server's
  ``worker_not_found``.
* **Retries that never duplicate work.** ``429`` and ``503`` are retried (the API writes nothing when
  it refuses a request), after ``Retry-After`` when the answer has one (seconds or an HTTP date),
  else after an exponential backoff with jitter. A failed connection is retried only when repeating
  the request is harmless: the request never left (connection refused), it is a GET, HEAD, PUT or
  DELETE, or it carries an ``Idempotency-Key``. :meth:`Client.submit` sends a fresh key with every
  call (unless given one), so a submit retried after a lost answer returns the first task instead of
  creating a second one.
* **Sessions that renew themselves.** With a username and password the client logs in, sends the
  access token, on a ``401`` refreshes it once (logging in again if the refresh token has expired
  too) and repeats the request; :meth:`Client.close` logs out, revoking both tokens.

This module is the client side only: it imports nothing of the server (Flask, Celery, the
database), so it can be installed and used anywhere ``requests`` is. Its errors
(:mod:`aios_client.errors`) are its own: :class:`AiosError` is not :class:`aios.errors.AiosError` (which
the server raises). A :class:`Client` keeps one HTTP connection pool and token state: use one per thread.
"""

from __future__ import annotations

import email.utils
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote

import requests
import urllib3

from aios_client import errors
from aios_client.errors import *  # noqa: F403 - the errors stay importable from here, as before
from aios_client.errors import (
    ERRORS_BY_CODE,
    ERRORS_BY_STATUS,
    AiosError,
    ConnectionFailed,
    TaskFailed,
    Unauthorized,
    WaitTimeout,
)

#: The SDK's names. The errors live in :mod:`aios_client.errors` (its ``__all__``); they stay importable
#: from here too.
__all__ = [
    "Client",
    "Event",
    "TERMINAL_STATES",
    "backoff_s",
    "error_from_response",
    "parse_retry_after",
    "parse_sse",
    *errors.__all__,
]

#: Task states after which nothing changes any more.
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "DEAD"})
#: Answers that mean "not now": nothing was done, the same request may be sent again.
RETRY_STATUSES = frozenset({429, 503})
#: Methods whose repetition has the same effect as sending them once.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: Largest page of :meth:`Client.list` with ``fields=`` (whole bodies).
FIELDS_PAGE_MAX = 50
#: A listing's rows (named here: inside :class:`Client`, ``list`` is its method, not the type).
Rows = list[dict[str, Any]]


# --------------------------------------------------------------------------- error answers


def error_from_response(response: requests.Response) -> AiosError:
    """The exception for an error answer: by its ``error`` code, else by its status, else the base."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        text = (response.text or response.reason or "").strip()
        body = {"error": f"http_{response.status_code}", "message": text[:500] or f"HTTP {response.status_code}"}
    code = str(body.get("error") or f"http_{response.status_code}")
    cls = ERRORS_BY_CODE.get(code) or ERRORS_BY_STATUS.get(response.status_code, AiosError)
    field = body.get("field")
    return cls(
        str(body.get("message") or code),
        code=code,
        status=response.status_code,
        field=field if isinstance(field, str) else None,
        body=body,
    )


# --------------------------------------------------------------------------- retry timing


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110: delay-seconds or an HTTP date).

    ``None`` when absent or unreadable (the caller then backs off on its own); a date in the past is 0.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(seconds, 0.0) if seconds == seconds and seconds != float("inf") else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def backoff_s(attempt: int, *, base_s: float = 0.5, max_s: float = 8.0) -> float:
    """Exponential backoff with jitter for retry ``attempt`` (0-based): half fixed, half random, so
    many clients refused at the same moment do not come back at the same moment."""
    ceiling: float = min(max_s, base_s * 2**attempt)  # int ** int is typed Any (a negative power is a float)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the connection itself failed, so the server cannot have seen the request."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ == "NewConnectionError":  # urllib3: refused, unreachable, DNS
            return True
        current = getattr(current, "reason", None) or (
            current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        )
    return False


# --------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """Datetimes as ISO 8601 (a naive one is refused: the API needs a zone); containers recursively."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{value!r} has no time zone; use an aware datetime (e.g. tzinfo=timezone.utc)")
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _segment(value: str) -> str:
    """One path segment, escaped (agent and worker names contain ``@``, which may stay as it is)."""
    return quote(str(value), safe="@")


@dataclass(frozen=True)
class Event:
    """One server-sent event: its ``event`` name, ``data`` (decoded from JSON when it is JSON), ``id``."""

    event: str
    data: Any
    id: str | None = None


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Events from the lines of a ``text/event-stream`` (the WHATWG rules: ``:`` comments, multi-line
    ``data``, a blank line ends an event)."""
    name, data, event_id = "message", list[str](), None
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield Event(event=name, data=payload, id=event_id)
            name, data = "message", []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "event":
            name = value or "message"
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value


def _stream_lines(response: requests.Response) -> Iterator[str]:
    """The lines of a streamed answer as soon as each arrives.

    ``Response.iter_lines`` reads fixed-size chunks and so holds back the last event until more bytes
    come (psf/requests#2433); ``read1`` returns whatever has arrived. urllib3 1.x has no ``read1``: read
    byte by byte there. A broken stream raises :class:`requests.ConnectionError`.
    """
    raw = response.raw
    read1 = getattr(raw, "read1", None)
    buffer = b""
    while True:
        try:
            chunk = read1(65_536, decode_content=True) if read1 is not None else raw.read(1, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:  # reading raw: urllib3's errors, not requests'
            raise requests.ConnectionError(f"the stream broke: {exc}") from exc
        if not chunk:
            break
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- the client


class Client:
    """A session with one AIOS API.

    ``api_key`` (sent as ``X-API-Key``), or ``username`` and ``password`` (a token session), or the
    tokens of an earlier session (:meth:`with_tokens`). ``on_renew(access_token, refresh_token)`` is
    called whenever the client obtains new tokens (to store them, as ``aios login`` does). ``timeout``
    is each HTTP request's connect and read timeout in seconds; ``retries`` how many times a request
    refused with 429/503 or lost in a connection failure is sent again (0: never); a ``Retry-After``
    longer than ``max_retry_after_s`` is not waited for: :class:`RateLimited` is raised at once and its
    ``retry_after_s`` says when to come back. ``verify`` is passed to requests (a CA bundle path for a
    private CA, or ``False``).
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        access_token: str | None = None,
        refresh_token: str | None = None,
        on_renew: Callable[[str, str | None], None] | None = None,
        timeout: float = 10.0,
        retries: int = 3,
        verify: bool | str = True,
        max_retry_after_s: float = 60.0,
    ) -> None:
        given = [bool(api_key), bool(username or password), bool(access_token)]
        if sum(given) > 1:
            raise ValueError("give one of api_key, username and password, or access_token, not several")
        if not api_key and not access_token and not (username and password):
            raise ValueError("credentials required: api_key=..., or username=... and password=...")
        if retries < 0:
            raise ValueError(f"retries must be 0 or more (got {retries})")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.max_retry_after_s = max_retry_after_s
        self._api_key = api_key
        self._username = username
        self._password = password
        self._access_token: str | None = access_token
        self._refresh_token: str | None = refresh_token
        self._on_renew = on_renew
        self._token_lock = threading.Lock()
        self._http = requests.Session()
        self._http.verify = verify
        self._http.headers["Accept"] = "application/json"
        if username:
            self.login()

    @classmethod
    def with_tokens(cls, url: str, *, access_token: str, refresh_token: str | None = None, **options: Any) -> Client:
        """Resume a token session (tokens saved from :attr:`tokens`): the access token is refreshed with
        the refresh token when it expires; once that has expired too, calls raise :class:`Unauthorized`."""
        return cls(url, access_token=access_token, refresh_token=refresh_token, **options)

    @property
    def tokens(self) -> tuple[str | None, str | None]:
        """The session's current (access, refresh) tokens; (None, None) with an API key."""
        return self._access_token, self._refresh_token

    # ------------------------------------------------------------------ lifecycle and sessions

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, *, logout: bool = True) -> None:
        """Log out (revoking the access and refresh tokens) if this is a token session, unless ``logout`` is
        false (the tokens were saved to be used again); free the connection pool."""
        try:
            if self._access_token is not None and logout:
                try:
                    self._request("POST", "/api/v1/auth/logout")
                except (AiosError, requests.RequestException):
                    pass  # tokens expire on their own; closing must not fail because the API is away
                self._access_token = self._refresh_token = None
        finally:
            self._http.close()

    def login(self) -> None:
        """Exchange the username and password for a fresh access and refresh token."""
        answer = self._request(
            "POST",
            "/api/v1/auth/token",
            json={"username": self._username, "password": self._password},
            authenticated=False,
        ).json()
        self._access_token, self._refresh_token = answer["access_token"], answer["refresh_token"]
        self._renewed()

    def _renewed(self) -> None:
        if self._on_renew is not None and self._access_token is not None:
            self._on_renew(self._access_token, self._refresh_token)

    def _renew(self, rejected_token: str | None) -> None:
        """After a 401: refresh the access token, or log in again if the refresh token is refused too."""
        with self._token_lock:
            if self._access_token != rejected_token:
                return  # another thread renewed it meanwhile
            try:
                if self._refresh_token is None:
                    raise Unauthorized("the access token was refused and there is no refresh token")
                answer = self._request(
                    "POST",
                    "/api/v1/auth/refresh",
                    authenticated=False,
                    headers={"Authorization": f"Bearer {self._refresh_token}"},
                ).json()
                self._access_token = answer["access_token"]
                self._renewed()
            except Unauthorized:
                if not self._password:
                    raise
                self.login()

    def _auth_headers(self) -> dict[str, str]:
        if self._api_key:
            return {"X-API-Key": self._api_key}
        return {"Authorization": f"Bearer {self._access_token}"} if self._access_token else {}

    # ------------------------------------------------------------------ the one request loop

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        authenticated: bool = True,
        timeout: Any = None,
        stream: bool = False,
    ) -> requests.Response:
        """Send one API request with the retry and re-authentication rules of this module; raise the
        typed error for an error answer."""
        extra = dict(headers or {})
        repeatable = method in IDEMPOTENT_METHODS or "Idempotency-Key" in extra
        body = _jsonable(json) if json is not None else None
        attempt, renewed = 0, False
        while True:
            sent_headers = {**(self._auth_headers() if authenticated else {}), **extra}
            try:
                response = self._http.request(
                    method,
                    self.url + path,
                    json=body,
                    params=params,
                    headers=sent_headers,
                    timeout=timeout or self.timeout,
                    stream=stream,
                )
            except requests.RequestException as exc:
                if attempt < self.retries and (repeatable or _never_sent(exc)):
                    time.sleep(backoff_s(attempt))
                    attempt += 1
                    continue
                raise ConnectionFailed(f"{method} {path}: {exc}") from exc
            if response.status_code == 401 and authenticated and not renewed and self._access_token:
                response.close()
                renewed = True
                self._renew(sent_headers.get("Authorization", "")[7:] or None)
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                delay = parse_retry_after(response.headers.get("Retry-After"))
                if delay is None or delay <= self.max_retry_after_s:
                    response.close()
                    time.sleep(backoff_s(attempt) if delay is None else delay)
                    attempt += 1
                    continue
            if response.status_code >= 400:
                error = error_from_response(response)
                response.close()
                raise error
            return response

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self._request(method, path, **kwargs).json()  # every answer is a JSON object
        return body

    # ------------------------------------------------------------------ tasks

    def submit(
        self,
        type: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Submit one task; returns it as stored (state QUEUED, PENDING or SCHEDULED).

        ``options`` are the task fields of ``POST /api/v1/tasks``: ``priority``, ``max_retries``,
        ``timeout_s``, ``queue``, ``routing``, ``agent``, ``on_agent_lost``, ``run_at`` (an aware
        datetime or ISO string), ``delay_s``. Every call sends an ``Idempotency-Key`` (a new UUID unless
        ``idempotency_key`` is given), so a retry after a lost answer cannot create a second task;
        pass your own key to make a submit safe to repeat across processes or restarts.
        """
        key = idempotency_key or str(uuid.uuid4())
        return self._json(
            "POST",
            "/api/v1/tasks",
            json={"type": type, "parameters": dict(parameters or {}), **options},
            headers={"Idempotency-Key": key},
        )

    def submit_batch(self, tasks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """Submit up to ``api.batch_max_tasks`` tasks in one transaction (all or none);
        answers ``{"ids", "count", "queued", "pending", "scheduled"}``. Retried on 429/503 only: the
        batch route has no idempotency key, so a batch whose answer was lost is not sent again."""
        return self._json("POST", "/api/v1/tasks/batch", json={"tasks": [dict(task) for task in tasks]})

    def get(self, task_id: str) -> dict[str, Any]:
        """The task with its ``events`` (every state change)."""
        return self._json("GET", f"/api/v1/tasks/{_segment(task_id)}")

    def list(self, *, page_size: int = 100, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every task matching ``filters`` (``state`` — a string or a list —, ``type``, ``priority``,
        ``created_after``, ``created_before``), newest first, fetching ``page_size`` at a time as the
        iterator is consumed (keyset pages: deep pages cost the server no more than the first).

        Listed tasks carry previews of ``parameters``, ``result`` and ``error`` (``result_preview``,
        ``result_truncated``, ...), not the bodies: :meth:`get` or :meth:`result` read them whole, or
        ``fields=["result"]`` (or ``"parameters,result,error"``) lists them whole, ``page_size`` then at
        most :data:`FIELDS_PAGE_MAX` (the server's ``api.page_max_with_bodies`` default)."""
        params = {
            key: (",".join(value) if isinstance(value, list | tuple | set | frozenset) else _jsonable(value))
            for key, value in filters.items()
            if value is not None
        }
        params["limit"] = min(page_size, FIELDS_PAGE_MAX) if params.get("fields") else page_size
        while True:
            page = self._json("GET", "/api/v1/tasks", params=params)
            yield from page["tasks"]
            if not page.get("next_cursor"):
                return
            params["cursor"] = page["next_cursor"]

    def wait(
        self,
        task_id: str,
        timeout: float | None = 60.0,
        *,
        poll_s: float | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the task is finished (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT or DEAD) and return
        it, whatever its outcome; :class:`WaitTimeout` (with the last ``task`` seen) after ``timeout``
        seconds (``None``: no limit). The poll interval grows from 0.1 s to 2 s unless ``poll_s`` is set.
        ``on_change(task)`` is called with the first answer and each one that differs from the one before
        (a new state, a progress report): a progress bar's hook."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll_s or 0.1
        previous: dict[str, Any] | None = None
        while True:
            task = self.get(task_id)
            if on_change is not None and task != previous:
                on_change(task)
            previous = task
            if task["state"] in TERMINAL_STATES:
                return task
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"task {task_id} is still {task['state']} after {timeout:g} s", task=task)
            pause = interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic()))
            time.sleep(pause)
            if poll_s is None:
                interval = min(interval * 1.5, 2.0)

    def result(self, task_id: str, timeout: float | None = 60.0, *, poll_s: float | None = None) -> Any:
        """Wait for the task and return its ``result``; :class:`TaskFailed` (with the task and its
        ``error``) if it ended in any other state than SUCCEEDED, :class:`WaitTimeout` as :meth:`wait`."""
        task = self.wait(task_id, timeout, poll_s=poll_s)
        if task["state"] != "SUCCEEDED":
            raise TaskFailed(task)
        return task["result"]

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel an unfinished task (:class:`Conflict` if it has finished); returns it, CANCELLED."""
        return self._json("DELETE", f"/api/v1/tasks/{_segment(task_id)}")

    def retry(self, task_id: str) -> dict[str, Any]:
        """Run a FAILED, DEAD, CANCELLED or TIMED_OUT task again; returns the new task (``retry_of`` set)."""
        return self._json("POST", f"/api/v1/tasks/{_segment(task_id)}/retry")

    def task_types(self) -> Rows:
        """The task types the API accepts, with their parameter JSON schemas."""
        return self._json("GET", "/api/v1/tasks/types")["types"]  # type: ignore[no-any-return]

    def bulk(self, action: str, *, dry_run: bool = False, limit: int | None = None, **filter: Any) -> dict[str, Any]:
        """Cancel or retry (``action``) every task ``filter`` selects (``state`` — a string or a list —,
        ``type``, ``priority``, ``q``, ``agent``, ``schedule``, ``owner``, ``queue``, ``created_after``,
        ``created_before``, ``ids``). A selection larger than ``limit`` is refused whole (:class:`Conflict`);
        ``dry_run`` counts and samples it and changes nothing. Answers ``{"matched", "sample_ids", "done",
        "skipped", ...}``. Retried on 429/503 only (no idempotency key on this route)."""
        if isinstance(filter.get("state"), str):
            filter["state"] = [filter["state"]]
        body: dict[str, Any] = {"action": action, "filter": filter, "dry_run": dry_run}
        if limit is not None:
            body["limit"] = limit
        return self._json("POST", "/api/v1/tasks/bulk", json=body)

    def events(self, task_id: str, *, after: int | str | None = None, read_timeout_s: float = 60.0) -> Iterator[Event]:
        """The task's timeline as it happens (``GET /api/v1/tasks/{id}/events``): its past events after
        ``after`` (an event id), then each new one — ``state``, ``progress``, ``note`` — and finally
        ``end`` once the task has finished, where the iterator stops. A stream the server closes early
        (``api.sse_max_s``) or a lost connection is resumed with ``Last-Event-ID``: nothing is missed,
        nothing repeated. ``read_timeout_s`` bounds a silence (the server sends a comment every 15 s)."""
        yield from self._follow(f"/api/v1/tasks/{_segment(task_id)}/events", {}, after, read_timeout_s, until_end=True)

    def all_events(self, *, after: str | None = None, read_timeout_s: float = 60.0, **filters: Any) -> Iterator[Event]:
        """Every task and agent event from now on (or after ``after``), endlessly (``GET /api/v1/events``);
        ``filters``: ``types``, ``state``, ``type``, ``agent`` (strings or lists). Resumed like :meth:`events`."""
        params = {
            key: ",".join(value) if isinstance(value, list | tuple | set | frozenset) else value
            for key, value in filters.items()
            if value is not None
        }
        yield from self._follow("/api/v1/events", params, after, read_timeout_s, until_end=False)

    def _follow(
        self, path: str, params: dict[str, Any], after: int | str | None, read_timeout_s: float, *, until_end: bool
    ) -> Iterator[Event]:
        last = None if after is None else str(after)
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last is not None else {})}
            opened, delivered = time.monotonic(), False
            response = self._request(
                "GET", path, params=params, stream=True, headers=headers, timeout=(self.timeout, read_timeout_s)
            )
            try:
                for event in parse_sse(_stream_lines(response)):
                    failures, delivered = 0, True
                    last = event.id if event.id is not None else last
                    yield event
                    if until_end and event.event == "end":
                        return
                lost: Exception | None = None
            except requests.RequestException as exc:
                lost = exc
            finally:
                response.close()
            # The stream ended without its end: resume from the last id. A stream that delivered events or
            # stayed open a while was closed on purpose (api.sse_max_s); one that broke, or closed at once
            # with nothing, counts against the retries.
            if lost is not None or (not delivered and time.monotonic() - opened < 1.0):
                failures += 1
                if failures > self.retries:
                    raise ConnectionFailed(f"GET {path}: the event stream keeps breaking ({lost or 'closed'})")
                time.sleep(backoff_s(failures - 1))

    # ------------------------------------------------------------------ commands

    def run_command(
        self, argv: Sequence[str], *, wait_s: float | None = None, idempotency_key: str | None = None, **options: Any
    ) -> dict[str, Any]:
        """Run a command on an agent (``POST /api/v1/commands``): ``argv`` and the options ``env``,
        ``cwd``, ``timeout_s``, ``limits``, ``agent``, ``priority``. With ``wait_s`` the API holds the
        answer up to that long and returns the finished task (else the task as accepted); use
        :meth:`wait` or :meth:`result` for longer. Like :meth:`submit` it sends an ``Idempotency-Key``
        (``idempotency_key``, or a new one per call), so a retry never starts the command twice."""
        key = idempotency_key or str(uuid.uuid4())
        body: dict[str, Any] = {"argv": list(argv), **options}
        if wait_s is not None:
            body["wait_s"] = wait_s
        read_timeout = self.timeout + (wait_s or 0)
        return self._json(
            "POST",
            "/api/v1/commands",
            json=body,
            headers={"Idempotency-Key": key},
            timeout=(self.timeout, read_timeout),
        )

    # ------------------------------------------------------------------ agents

    def agents(self, *, status: str | Sequence[str] | None = None, capability: str | None = None) -> Rows:
        params: dict[str, str] = {}
        if status:
            params["status"] = status if isinstance(status, str) else ",".join(status)
        if capability:
            params["capability"] = capability
        return self._json("GET", "/api/v1/agents", params=params)["agents"]  # type: ignore[no-any-return]

    def agent(self, name: str) -> dict[str, Any]:
        """The agent with its active and recent tasks and its recent status changes."""
        return self._json("GET", f"/api/v1/agents/{_segment(name)}")

    def update_agent(self, name: str, **changes: Any) -> dict[str, Any]:
        """Change ``status`` (ONLINE, DRAINING, DISABLED), ``weight``, ``capabilities`` or ``labels``."""
        return self._json("PATCH", f"/api/v1/agents/{_segment(name)}", json=changes)

    def drain_agent(self, name: str) -> dict[str, Any]:
        """Let the agent finish its running tasks and take no new ones (waiting ones go elsewhere)."""
        return self.update_agent(name, status="DRAINING")

    def disable_agent(self, name: str) -> dict[str, Any]:
        return self.update_agent(name, status="DISABLED")

    def enable_agent(self, name: str) -> dict[str, Any]:
        return self.update_agent(name, status="ONLINE")

    # ------------------------------------------------------------------ API keys

    def keys(self) -> Rows:
        """The caller's keys (every key for an admin); never a secret."""
        return self._json("GET", "/api/v1/keys")["keys"]  # type: ignore[no-any-return]

    def create_key(self, name: str, role: str, *, expires_in_days: int | None = None) -> dict[str, Any]:
        """A new key; its plaintext is in ``["key"]`` of this answer only."""
        body: dict[str, Any] = {"name": name, "role": role}
        if expires_in_days is not None:
            body["expires_in_days"] = expires_in_days
        return self._json("POST", "/api/v1/keys", json=body)

    def rotate_key(self, key_id: str, *, grace_s: int | None = None) -> dict[str, Any]:
        """A successor key (plaintext in ``["key"]``); the old one works ``grace_s`` more seconds."""
        return self._json(
            "POST", f"/api/v1/keys/{_segment(key_id)}/rotate", json={} if grace_s is None else {"grace_s": grace_s}
        )

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._json("POST", f"/api/v1/keys/{_segment(key_id)}/revoke")

    def delete_key(self, key_id: str) -> None:
        self._request("DELETE", f"/api/v1/keys/{_segment(key_id)}").close()

    # ------------------------------------------------------------------ schedules

    def schedules(self) -> Rows:
        return self._json("GET", "/api/v1/schedules")["schedules"]  # type: ignore[no-any-return]

    def schedule(self, schedule_id: str) -> dict[str, Any]:
        return self._json("GET", f"/api/v1/schedules/{_segment(schedule_id)}")

    def create_schedule(
        self,
        name: str,
        task: Mapping[str, Any],
        *,
        cron: str | None = None,
        interval_s: int | None = None,
        enabled: bool = True,
    ) -> dict[str, Any]:
        """A periodic task: ``task`` is a submit body (``{"type": ..., "parameters": ...}``), fired on
        ``cron`` (five fields, UTC) or every ``interval_s`` seconds — exactly one of them."""
        body: dict[str, Any] = {"name": name, "task": dict(task), "enabled": enabled}
        if cron is not None:
            body["cron"] = cron
        if interval_s is not None:
            body["interval_s"] = interval_s
        return self._json("POST", "/api/v1/schedules", json=body)

    def update_schedule(self, schedule_id: str, **changes: Any) -> dict[str, Any]:
        """Change ``name``, ``cron`` or ``interval_s``, ``task`` or ``enabled``."""
        return self._json("PATCH", f"/api/v1/schedules/{_segment(schedule_id)}", json=changes)

    def delete_schedule(self, schedule_id: str) -> None:
        self._request("DELETE", f"/api/v1/schedules/{_segment(schedule_id)}").close()

    # ------------------------------------------------------------------ cluster

    def queues(self) -> Rows:
        """``GET /api/v1/queues``: every AIOS queue with its depth per priority and its consumers."""
        return self._json("GET", "/api/v1/queues")["queues"]  # type: ignore[no-any-return]

    def status(self) -> dict[str, Any]:
        """``GET /api/v1/status``: agents, task counts, queues, beat leader, last sync and backup."""
        return self._json("GET", "/api/v1/status")
