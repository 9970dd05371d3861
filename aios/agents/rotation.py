"""Routing state shared by every API process: the round-robin cursor and weighted credits.

Held in Redis (an optimistic compare-and-set script) when the broker is Redis, else in the
``routing_state`` table under a row lock. Reading, computing (with the pure functions of
:mod:`aios.agents.routing`) and writing are one atomic step, so two API processes never hand out the same turn.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from aios.broker.redis_clients import redis_client
from aios.config import Settings
from aios.db import get_engine, session_scope
from aios.errors import ServiceUnavailable
from aios.models import RoutingState

logger = logging.getLogger(__name__)

Result = TypeVar("Result")
Update = Callable[[dict[str, Any]], tuple[Result, dict[str, Any]]]

_redis_clients: dict[str, Any] = {}
#: Tries of the optimistic compare-and-set before giving up (each lost try means another writer won).
REDIS_STATE_ATTEMPTS = 200
#: After this many lost tries in a row a writer waits a random moment (up to a few ms, growing) before
#: the next: under many concurrent writers (16 threads in tests/integration/test_rotation.py) one
#: that always retried at once could lose every race to the others.
REDIS_STATE_BACKOFF_AFTER = 3
REDIS_STATE_BACKOFF_S = 0.0005


def _redis(settings: Settings) -> Any:
    client = _redis_clients.get(settings.broker.url)
    if client is None:
        # Through Sentinel this client finds the current master on each new connection itself.
        client = _redis_clients[settings.broker.url] = redis_client(
            settings.broker, socket_connect_timeout=1, socket_timeout=2
        )
    return client


def with_state(settings: Settings, key: str, update: Update[Result]) -> Result:
    """Run ``update(state) -> (result, new_state)`` atomically against the shared state ``key``."""
    if settings.broker.is_redis:
        try:
            return _with_redis_state(settings, key, update)
        except Exception as exc:  # noqa: BLE001 - no Redis: the broker is down too; route from a fresh state
            logger.warning("routing state unavailable in Redis (%s); using a local rotation", exc)
            return update({})[0]
    return _with_database_state(settings, key, update)


#: Compare-and-set in one round trip: write ARGV[2] if the key still holds ARGV[1] ("" = absent);
#: otherwise return what it holds, for the caller to compute again from.
_COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if (current or '') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return {1}
end
return {0, current}
"""
#: Per Redis client: its registered script, and the last value this process saw under each key.
_cas_scripts: dict[int, Any] = {}
_last_seen: dict[str, bytes] = {}


def _with_redis_state(settings: Settings, key: str, update: Update[Result]) -> Result:
    """Optimistic compare-and-set: compute from the value this process last saw and write it only if
    nobody wrote since (a Lua script, atomic in Redis); if somebody did, the script returns what they
    wrote and the turn is computed again from that. One round trip while this process has the
    latest value, two when another wrote in between: the WATCH/GET/MULTI this replaces always took
    three. No lock to wait for: redis-py's lock polls every 100 ms (BENCHMARKS.md)."""
    client = _redis(settings)
    script = _cas_scripts.get(id(client))
    if script is None:
        script = _cas_scripts.setdefault(id(client), client.register_script(_COMPARE_AND_SET))
    name = f"{settings.broker.key_prefix}aios:routing:{key}"
    seen = _last_seen.get(name, b"")
    for attempt in range(REDIS_STATE_ATTEMPTS):
        version, state = _versioned(seen)
        result, state = update(state)
        # The version makes every write differ from every earlier one: the state alone repeats (a
        # round robin over three agents comes back to the same cursor every three turns), and a
        # compare-and-set against a stale copy that happens to match again would hand out a turn twice.
        written = json.dumps({"version": version + 1, "state": state}).encode()
        answer = script(keys=[name], args=[seen, written])
        if answer[0] == 1:
            _last_seen[name] = written
            return result
        seen = answer[1] or b""
        _last_seen[name] = seen
        if attempt >= REDIS_STATE_BACKOFF_AFTER:
            time.sleep(random.uniform(0, REDIS_STATE_BACKOFF_S * (attempt - REDIS_STATE_BACKOFF_AFTER + 1)))
    # Contention, not a fault: a moment later the next try wins (503 with Retry-After, should it escape a request).
    raise ServiceUnavailable(
        f"routing state {key}: {REDIS_STATE_ATTEMPTS} concurrent writers in a row won the race; try again",
        headers={"Retry-After": "1"},
    )


def _versioned(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(version, state) of a stored value; a value written before versions (the bare state) is version 0."""
    if not raw:
        return 0, {}
    stored = json.loads(raw)
    if isinstance(stored, dict) and set(stored) == {"version", "state"}:
        return int(stored["version"]), dict(stored["state"])
    return 0, stored


def _with_database_state(settings: Settings, key: str, update: Update[Result]) -> Result:
    dialect = get_engine(settings.database).dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    with session_scope(settings.database) as session:
        session.execute(insert(RoutingState).values(key=key, state={}).on_conflict_do_nothing())
        row = session.scalars(select(RoutingState).where(RoutingState.key == key).with_for_update()).one()
        result, state = update(dict(row.state or {}))
        row.state = state
    return result
