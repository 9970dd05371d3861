"""API keys: ``aios_<prefix>_<secret>``, 192 bits of secret, stored only as a SHA-256 hash.

A fast hash is right here (unlike passwords): the secret is random and long, so there is nothing to
guess. The prefix finds the row; the hash is compared in constant time. No cache: every request reads
the row, so a revoke holds on every API process at once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, func, or_, select, update
from sqlalchemy.orm import Session

from aios.models import ApiKey, User
from aios.security import audit
from aios.timeutil import as_utc, isoformat, utcnow

KEY_PREFIX = "aios"
PREFIX_CHARS = 10
ACTIVE, REVOKED = "ACTIVE", "REVOKED"
#: Set by the sync job on an ACTIVE key past ``expires_at`` (a rotated key past its grace period, too).
#: Authentication never needed it (``expires_at`` is checked on every request); it makes lists honest.
EXPIRED = "EXPIRED"
#: last_used_at is written at most this often per key, so authentication is not a write per request.
LAST_USED_RESOLUTION_S = 30


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    plaintext: str


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def looks_like_key(value: str) -> bool:
    return value.startswith(f"{KEY_PREFIX}_") and value.count("_") >= 2


def split_key(value: str) -> tuple[str, str] | None:
    parts = value.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


def generate(session: Session, *, name: str, role: str, owner_id: int, expires_at: datetime | None) -> NewKey:
    prefix = secrets.token_hex(PREFIX_CHARS // 2)
    secret = secrets.token_urlsafe(24)  # 192 bits
    row = ApiKey(
        id=str(uuid.uuid4()),
        name=name,
        prefix=prefix,
        secret_hash=hash_secret(secret),
        role=role,
        owner_id=owner_id,
        state=ACTIVE,
        expires_at=expires_at,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return NewKey(row=row, plaintext=f"{KEY_PREFIX}_{prefix}_{secret}")


def count_usable(session: Session, owner_id: int, now: datetime) -> int:
    """How many of ``owner_id``'s keys work now (ACTIVE and unexpired): what ``max_keys_per_user`` caps."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(ApiKey)
            .where(
                ApiKey.owner_id == owner_id,
                ApiKey.state == ACTIVE,
                or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > now),
            )
        )
        or 0
    )


def is_usable(row: Any, now: datetime) -> bool:
    """``row``: an ApiKey, or any row with its ``state`` and ``expires_at``."""
    expires_at = as_utc(row.expires_at)
    return row.state == ACTIVE and (expires_at is None or expires_at > now)


@dataclass(frozen=True)
class KeyMatch:
    """What authentication needs of a usable key and its owner, read in one statement."""

    key_id: str
    prefix: str
    key_role: str
    owner_id: int
    owner_name: str
    owner_role: str
    owner_disabled: bool


_KEY_AND_OWNER = (
    select(
        ApiKey.id,
        ApiKey.prefix,
        ApiKey.secret_hash,
        ApiKey.role,
        ApiKey.state,
        ApiKey.expires_at,
        ApiKey.last_used_at,
        ApiKey.last_used_ip,
        User.id.label("owner_id"),
        User.name.label("owner_name"),
        User.role.label("owner_role"),
        User.disabled.label("owner_disabled"),
    )
    .join(User, User.id == ApiKey.owner_id)
    .where(ApiKey.prefix == bindparam("prefix"))
)


def authenticate(connection: Connection, presented: str, *, source_ip: str | None) -> KeyMatch | None:
    """The key and its owner if ``presented`` is a usable key, else None. Records last use (coarsely).

    Core, not the ORM: this runs on every API-key request, and one SELECT of plain columns costs a
    fraction of loading two mapped objects. Nothing is cached, so a revoke, a disabled owner or a
    demotion holds at once on every API process. A write happens only when ``last_used_at`` is older
    than :data:`LAST_USED_RESOLUTION_S` (or the address changed); it is committed here.
    """
    parts = split_key(presented)
    if parts is None:
        return None
    prefix, secret = parts
    row = connection.execute(_KEY_AND_OWNER, {"prefix": prefix}).one_or_none()
    if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
        return None
    now = utcnow()
    if not is_usable(row, now):
        return None
    last = as_utc(row.last_used_at)
    if last is None or now - last > timedelta(seconds=LAST_USED_RESOLUTION_S) or row.last_used_ip != source_ip:
        connection.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now, last_used_ip=source_ip))
        connection.commit()
    return KeyMatch(
        key_id=row.id,
        prefix=row.prefix,
        key_role=row.role,
        owner_id=row.owner_id,
        owner_name=row.owner_name,
        owner_role=row.owner_role,
        owner_disabled=bool(row.owner_disabled),
    )


def expire_due(session: Session, now: datetime, *, limit: int) -> list[ApiKey]:
    """Mark ACTIVE keys whose ``expires_at`` passed EXPIRED (at most ``limit``); returns the rows changed.

    One conditional UPDATE per key, so a key revoked meanwhile stays REVOKED. The caller commits
    (and audits).
    """
    due = list(
        session.scalars(
            select(ApiKey)
            .where(ApiKey.state == ACTIVE, ApiKey.expires_at.is_not(None), ApiKey.expires_at <= now)
            .order_by(ApiKey.expires_at)
            .limit(limit)
        )
    )
    changed = []
    for row in due:
        won = session.execute(
            update(ApiKey).where(ApiKey.id == row.id, ApiKey.state == ACTIVE).values(state=EXPIRED).returning(ApiKey.id)
        ).first()
        if won is not None:
            changed.append(row)
    return changed


def expire_and_audit(session: Session, now: datetime, *, actor: str, limit: int) -> int:
    """Mark keys past ``expires_at`` EXPIRED (:func:`expire_due`) with one ``key.expire`` audit row each,
    by ``actor`` (the sync job runs it as its ``keys`` step); returns how many. The caller commits."""
    expired = expire_due(session, now, limit=limit)
    for key in expired:
        audit.record(
            session,
            principal=actor,
            role=None,
            source_ip=None,
            action="key.expire",
            target=key.id,
            outcome=audit.SUCCESS,
            detail={
                "expires_at": isoformat(key.expires_at),
                "rotated_to": key.rotated_to,
                "owner_id": key.owner_id,
            },
        )
    return len(expired)
