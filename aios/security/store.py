"""Short-lived shared state: revoked token ids, rate-limit windows, login-failure counters, leases.

Every API process must see the same state (a logout or a lockout holds on all of them):

* Rate-limit and login-failure counters live in Redis when the broker is Redis (a write per request
  is what Redis is for) and in the database (table ``counters``) on the embedded default. If Redis
  is unreachable they fail open, with a warning: a broker outage must not stop the API from taking
  work (tasks stay PENDING and are dispatched later).
* Leases count what a principal holds open right now (event streams, command waits) so that a cap
  per principal holds across every API process. Each lease expires by itself after its ``ttl_s``
  unless renewed, so a process killed with SIGKILL leaks nothing for longer than that. Same stores,
  same fail-open rule as the counters.
* Revoked token ids always live in the database. Brokers often run Redis without persistence; a
  Redis restart must not bring logged-out tokens back to life.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from aios.broker.redis_clients import redis_client
from aios.config import BrokerSettings, Settings
from aios.db import get_engine, session_scope
from aios.models import Counter
from aios.timeutil import as_utc, utcnow


class SecurityStore(Protocol):
    def hit(self, key: str, window_s: int) -> tuple[int, int]:
        """Count one event in the window that ``key`` is in; returns (count so far, seconds left)."""

    def peek(self, key: str) -> tuple[int, int]:
        """(count, seconds left) without counting; (0, 0) when there is no live window."""

    def clear(self, key: str) -> None: ...

    def revoke_token(self, jti: str, ttl_s: int) -> None: ...

    def is_token_revoked(self, *jtis: str) -> bool:
        """Whether any of these token ids is revoked (one look-up for them all)."""

    def take_lease(self, scope: str, lease_id: str, ttl_s: float, limit: int | None) -> tuple[bool, int]:
        """Hold ``lease_id`` in ``scope`` for ``ttl_s`` unless ``limit`` live leases are held there
        already (None: no limit, i.e. a renewal); returns (granted, seconds until the first lease of
        the scope expires when refused)."""

    def drop_lease(self, scope: str, lease_id: str) -> None: ...


#: Atomic take-or-refuse of a lease in a sorted set scored by expiry (Redis server time, so the API
#: hosts' clocks do not matter). KEYS[1] scope; ARGV lease id, ttl seconds, limit (-1: none).
_TAKE_LEASE = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[3])
if limit >= 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.ceil(tonumber(first[2]) - now)}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('TTL', KEYS[1]) < ttl then redis.call('EXPIRE', KEYS[1], math.ceil(ttl)) end
return {1, 0}
"""


logger = logging.getLogger(__name__)


class RedisStore:
    """Counters in Redis (failing open when it is down); revoked tokens in the database."""

    def __init__(self, broker: BrokerSettings, database: DatabaseStore) -> None:
        import redis

        self.redis_error = redis.RedisError
        self.client = redis_client(broker, socket_connect_timeout=1, socket_timeout=1)
        self.prefix = f"{broker.key_prefix}aios:sec:"
        self.database = database

    def hit(self, key: str, window_s: int) -> tuple[int, int]:
        name = self.prefix + key
        try:
            pipe = self.client.pipeline()
            pipe.incr(name)
            pipe.expire(name, window_s, nx=True)
            pipe.ttl(name)
            count, _, ttl = pipe.execute()
        except self.redis_error as exc:
            logger.warning("rate-limit store unreachable, not counting %s: %s", key.split(":")[0], exc)
            return 0, 0
        return int(count), max(int(ttl), 1)

    def peek(self, key: str) -> tuple[int, int]:
        name = self.prefix + key
        try:
            pipe = self.client.pipeline()
            pipe.get(name)
            pipe.ttl(name)
            value, ttl = pipe.execute()
        except self.redis_error as exc:
            logger.warning("rate-limit store unreachable: %s", exc)
            return 0, 0
        return (int(value), max(int(ttl), 1)) if value is not None else (0, 0)

    def clear(self, key: str) -> None:
        try:
            self.client.delete(self.prefix + key)
        except self.redis_error as exc:
            logger.warning("rate-limit store unreachable: %s", exc)

    def revoke_token(self, jti: str, ttl_s: int) -> None:
        self.database.revoke_token(jti, ttl_s)

    def is_token_revoked(self, *jtis: str) -> bool:
        return self.database.is_token_revoked(*jtis)

    def take_lease(self, scope: str, lease_id: str, ttl_s: float, limit: int | None) -> tuple[bool, int]:
        try:
            granted, retry_after = self.client.eval(
                _TAKE_LEASE, 1, self.prefix + scope, lease_id, ttl_s, -1 if limit is None else limit
            )
        except self.redis_error as exc:
            logger.warning("lease store unreachable, not counting %s: %s", scope.split(":")[1], exc)
            return True, 0
        return (False, max(int(retry_after), 1)) if not granted else (True, 0)

    def drop_lease(self, scope: str, lease_id: str) -> None:
        try:
            self.client.zrem(self.prefix + scope, lease_id)
        except self.redis_error as exc:
            logger.warning("lease store unreachable: %s", exc)


class DatabaseStore:
    """The same on the ``counters`` table: one upsert per event, atomic on PostgreSQL and SQLite."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _upsert(self, key: str, window_s: int) -> tuple[int, int]:
        now = utcnow()
        expires = now + timedelta(seconds=window_s)
        dialect = get_engine(self.settings.database).dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        statement = insert(Counter).values(key=key, value=1, expires_at=expires)
        from sqlalchemy import case

        expired = Counter.expires_at <= now
        upsert = statement.on_conflict_do_update(
            index_elements=[Counter.key],
            set_={
                "value": case((expired, 1), else_=Counter.value + 1),
                "expires_at": case((expired, expires), else_=Counter.expires_at),
            },
        ).returning(Counter.value, Counter.expires_at)
        with session_scope(self.settings.database) as session:
            value, expires_at = session.execute(upsert).one()
        return int(value), _seconds_left(expires_at, now)

    def hit(self, key: str, window_s: int) -> tuple[int, int]:
        return self._upsert(key, window_s)

    def peek(self, key: str) -> tuple[int, int]:
        now = utcnow()
        with session_scope(self.settings.database) as session:
            row = session.execute(select(Counter.value, Counter.expires_at).where(Counter.key == key)).first()
        if row is None or as_utc(row.expires_at) <= now:  # type: ignore[operator]
            return 0, 0
        return int(row.value), _seconds_left(row.expires_at, now)

    def clear(self, key: str) -> None:
        with session_scope(self.settings.database) as session:
            session.execute(delete(Counter).where(Counter.key == key))

    def revoke_token(self, jti: str, ttl_s: int) -> None:
        self._upsert(f"revoked:{jti}", max(ttl_s, 1))

    def is_token_revoked(self, *jtis: str) -> bool:
        keys = [f"revoked:{jti}" for jti in jtis]
        with session_scope(self.settings.database) as session:
            live = session.execute(
                select(Counter.key).where(Counter.key.in_(keys), Counter.expires_at > utcnow()).limit(1)
            ).first()
        return live is not None

    def take_lease(self, scope: str, lease_id: str, ttl_s: float, limit: int | None) -> tuple[bool, int]:
        """One ``counters`` row per lease (``<scope>:<lease id>``). The DELETE comes first: it takes
        SQLite's write lock, and PostgreSQL takes a transaction-scoped advisory lock on the scope, so two
        processes never both count below the limit and both insert."""
        now = utcnow()
        prefix = f"{scope}:"
        in_scope = Counter.key.startswith(prefix, autoescape=True)
        with session_scope(self.settings.database) as session:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(select(func.pg_advisory_xact_lock(func.hashtext(scope))))
            session.execute(delete(Counter).where(in_scope, Counter.expires_at <= now))
            mine = session.get(Counter, prefix + lease_id)
            if mine is None and limit is not None:
                count, first = session.execute(select(func.count(), func.min(Counter.expires_at)).where(in_scope)).one()
                if count >= limit:
                    return False, _seconds_left(first, now)
            expires = now + timedelta(seconds=ttl_s)
            if mine is None:
                session.add(Counter(key=prefix + lease_id, value=1, expires_at=expires))
            else:
                mine.expires_at = expires
        return True, 0

    def drop_lease(self, scope: str, lease_id: str) -> None:
        self.clear(f"{scope}:{lease_id}")


def _seconds_left(expires_at: datetime, now: datetime) -> int:
    """Whole seconds until ``expires_at`` (rounded up, at least 1): a TTL or a Retry-After."""
    return max(1, int((as_utc(expires_at) - now).total_seconds() + 0.999))  # type: ignore[operator]


def create_store(settings: Settings) -> SecurityStore:
    if settings.broker.is_redis:
        return RedisStore(settings.broker, DatabaseStore(settings))
    return DatabaseStore(settings)
