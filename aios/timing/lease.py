"""Leases: a named lock with an expiry, held by one process at a time, kept in the database.

The beat leader holds the lease ``beat``. It is a row, not a Redis key or a session-bound advisory
lock, on purpose: it lives in the source of truth (a Redis outage — exactly when sync has work to do —
must not leave the cluster without a leader), it works the same on PostgreSQL and SQLite, and it
survives a database connection drop without a spurious change of leader. One conditional UPDATE takes
or renews it (``WHERE holder = me OR expires_at < now``), so two processes can never both hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from aios.config import Settings
from aios.db import get_engine, session_scope
from aios.models import Lease
from aios.timeutil import as_utc, utcnow


@dataclass(frozen=True)
class LeaseInfo:
    name: str
    holder: str
    expires_at: datetime

    @property
    def live(self) -> bool:
        return self.expires_at > utcnow()


def acquire(settings: Settings, name: str, holder: str, ttl_s: float) -> bool:
    """Take the lease, or renew it if ``holder`` has it. False while someone else's is live."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl_s)
    dialect = get_engine(settings.database).dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    with session_scope(settings.database) as session:
        created = session.execute(
            insert(Lease)
            .values(name=name, holder=holder, expires_at=expires)
            .on_conflict_do_nothing()
            .returning(Lease.name)
        ).first()
        if created is not None:
            return True
        taken = session.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at < now))
            .values(holder=holder, expires_at=expires)
            .returning(Lease.name)
        ).first()
        return taken is not None


def release(settings: Settings, name: str, holder: str) -> None:
    """Give the lease up at once (a clean stop), so a standby need not wait for it to expire."""
    with session_scope(settings.database) as session:
        session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )


def current(settings: Settings, name: str) -> LeaseInfo | None:
    with session_scope(settings.database) as session:
        row = session.execute(select(Lease.holder, Lease.expires_at).where(Lease.name == name)).first()
    if row is None:
        return None
    return LeaseInfo(name=name, holder=row.holder, expires_at=as_utc(row.expires_at))  # type: ignore[arg-type]
