"""Short-lived shared state: revoked token ids, rate-limit windows, login-failure counters.

Every API process must see the same state (a logout or a lockout holds on all of them):

* Rate-limit and login-failure counters live in Redis when the broker is Redis (a write per request
  is what Redis is for) and in the database (table ``counters``) on the embedded default. If Redis
  is unreachable they fail open, with a warning: a broker outage must not stop the API from taking
  work (tasks stay PENDING and are dispatched later).
* Revoked token ids always live in the database. Brokers often run Redis without persistence; a
  Redis restart must not bring logged-out tokens back to life.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Protocol

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from aios.config import Settings
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

    def is_token_revoked(self, jti: str) -> bool: ...


logger = logging.getLogger(__name__)


class RedisStore:
    """Counters in Redis (failing open when it is down); revoked tokens in the database."""

    def __init__(self, url: str, prefix: str, database: DatabaseStore) -> None:
        import redis

        self.redis_error = redis.RedisError
        self.client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        self.prefix = f"{prefix}aios:sec:"
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

    def is_token_revoked(self, jti: str) -> bool:
        return self.database.is_token_revoked(jti)


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
        statement = statement.on_conflict_do_update(
            index_elements=[Counter.key],
            set_={
                "value": case((expired, 1), else_=Counter.value + 1),
                "expires_at": case((expired, expires), else_=Counter.expires_at),
            },
        ).returning(Counter.value, Counter.expires_at)
        with session_scope(self.settings.database) as session:
            value, expires_at = session.execute(statement).one()
        return int(value), max(1, int((as_utc(expires_at) - now).total_seconds() + 0.999))  # type: ignore[operator]

    def hit(self, key: str, window_s: int) -> tuple[int, int]:
        return self._upsert(key, window_s)

    def peek(self, key: str) -> tuple[int, int]:
        now = utcnow()
        with session_scope(self.settings.database) as session:
            row = session.execute(select(Counter.value, Counter.expires_at).where(Counter.key == key)).first()
        if row is None or as_utc(row.expires_at) <= now:  # type: ignore[operator]
            return 0, 0
        return int(row.value), max(1, int((as_utc(row.expires_at) - now).total_seconds() + 0.999))  # type: ignore[operator]

    def clear(self, key: str) -> None:
        with session_scope(self.settings.database) as session:
            session.execute(delete(Counter).where(Counter.key == key))

    def revoke_token(self, jti: str, ttl_s: int) -> None:
        self._upsert(f"revoked:{jti}", max(ttl_s, 1))

    def is_token_revoked(self, jti: str) -> bool:
        return self.peek(f"revoked:{jti}")[0] > 0


def create_store(settings: Settings) -> SecurityStore:
    if settings.broker.is_redis:
        return RedisStore(settings.broker.url, settings.broker.key_prefix, DatabaseStore(settings))
    return DatabaseStore(settings)
