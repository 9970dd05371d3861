"""Requests that hold a gunicorn thread for long: event streams and ``wait_s`` command waits.

Two caps keep them from freezing the API:

* **Per process** (:class:`ThreadBudget`): together they hold at most ``api.threads - 1`` of a
  process's threads, so ``/healthz`` and ordinary requests always find a free one. Event streams are
  further capped by ``api.sse_max_streams``. A stream refused here is a 503 with Retry-After; a wait
  refused here is not an error: the command is accepted and answered at once (202, as with
  ``wait_s: 0``), and the client follows the task (``GET /tasks/{id}``, its event stream).
* **Per principal** (:func:`hold`): a user (summed over all their API keys and tokens) holds at most
  ``api.sse_max_streams_per_principal`` streams and ``api.max_waits_per_principal`` waits across
  *every* API process: each is a lease in the shared security store (Redis, or the ``counters``
  table), 429 with Retry-After beyond. A lease expires by itself after its time to live unless it is
  renewed, so an API process killed mid-request frees its leases within that time.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable

from flask import current_app

from aios.config import Settings
from aios.errors import TooManyRequests
from aios.security.store import SecurityStore
from webapi.security import Principal, security_store

#: The kinds of long-held requests.
STREAM, WAIT = "sse", "wait"
#: Longest Retry-After a 429 from a per-principal cap asks for.
RETRY_AFTER_MAX_S = 30


class ThreadBudget:
    """The threads of one API process that long-held requests may take, shared by every kind."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        return sum(self.held.values())

    def take(self, kind: str, kind_limit: int | None = None) -> Callable[[], None] | None:
        """A thread for one request of ``kind`` (at most ``kind_limit`` of that kind), or None when
        none is free; the returned release is safe to call twice."""
        with self._lock:
            if self.open >= self.limit or (kind_limit is not None and self.held[kind] >= kind_limit):
                return None
            self.held[kind] += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self.held[kind] -= 1

        return release


def budget_limit(settings: Settings) -> int:
    return max(0, settings.api.threads - 1)


def thread_budget(settings: Settings) -> ThreadBudget:
    """This process's budget (one per Flask app, i.e. per gunicorn worker process)."""
    return current_app.extensions.setdefault("aios_thread_budget", ThreadBudget(budget_limit(settings)))  # type: ignore[no-any-return]


class Lease:
    """One principal's hold on one long request, in the shared store; renew it before ``ttl_s`` runs out."""

    def __init__(self, store: SecurityStore, scope: str, ttl_s: float) -> None:
        # The store itself, not the app's: a response closed unread is released outside any app context.
        self.store, self.scope, self.ttl_s, self.id = store, scope, ttl_s, uuid.uuid4().hex
        self._released = False

    def renew(self) -> None:
        if not self._released:
            self.store.take_lease(self.scope, self.id, self.ttl_s, None)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.store.drop_lease(self.scope, self.id)


def hold(kind: str, principal: Principal, limit: int, ttl_s: float, *, setting: str) -> Lease:
    """Take a lease of ``kind`` for ``principal`` (per user, whatever key or token it came with), or
    429 naming ``setting`` when the user already holds ``limit`` of them on all API processes."""
    lease = Lease(security_store(), f"lease:{kind}:user:{principal.user_id}", ttl_s)
    granted, retry_after = lease.store.take_lease(lease.scope, lease.id, ttl_s, limit)
    if not granted:
        what = "event streams open" if kind == STREAM else "command waits under way"
        raise TooManyRequests(
            f"user {principal.name!r} already has {limit} {what}, the limit ({setting}); close one or retry later",
            retry_after_s=min(retry_after, RETRY_AFTER_MAX_S),
        )
    return lease
