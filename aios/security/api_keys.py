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

from sqlalchemy import select, update
from sqlalchemy.orm import Session, joinedload

from aios.models import ApiKey
from aios.timeutil import as_utc, utcnow

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
    row = ApiKey(id=str(uuid.uuid4()), name=name, prefix=prefix, secret_hash=hash_secret(secret), role=role,
                 owner_id=owner_id, state=ACTIVE, expires_at=expires_at, created_at=utcnow())
    session.add(row)
    session.flush()
    return NewKey(row=row, plaintext=f"{KEY_PREFIX}_{prefix}_{secret}")


def is_usable(row: ApiKey, now: datetime) -> bool:
    expires_at = as_utc(row.expires_at)
    return row.state == ACTIVE and (expires_at is None or expires_at > now)


def authenticate(session: Session, presented: str, *, source_ip: str | None) -> ApiKey | None:
    """The key row if ``presented`` is a usable key, else None. Records last use (coarsely)."""
    parts = split_key(presented)
    if parts is None:
        return None
    prefix, secret = parts
    # The owner comes in the same query: the caller checks them on every request (disabled, role).
    row = session.scalars(select(ApiKey).options(joinedload(ApiKey.owner))
                          .where(ApiKey.prefix == prefix)).one_or_none()
    if row is None or not hmac.compare_digest(row.secret_hash, hash_secret(secret)):
        return None
    now = utcnow()
    if not is_usable(row, now):
        return None
    last = as_utc(row.last_used_at)
    if last is None or now - last > timedelta(seconds=LAST_USED_RESOLUTION_S) or row.last_used_ip != source_ip:
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=now, last_used_ip=source_ip))
    return row


def expire_due(session: Session, now: datetime, *, limit: int) -> list[ApiKey]:
    """Mark ACTIVE keys whose ``expires_at`` passed EXPIRED (at most ``limit``); returns the rows changed.

    One conditional UPDATE per key, so a key revoked meanwhile stays REVOKED. The caller commits
    (and audits).
    """
    due = list(session.scalars(select(ApiKey).where(ApiKey.state == ACTIVE, ApiKey.expires_at.is_not(None),
                                                    ApiKey.expires_at <= now)
                               .order_by(ApiKey.expires_at).limit(limit)))
    changed = []
    for row in due:
        won = session.execute(update(ApiKey).where(ApiKey.id == row.id, ApiKey.state == ACTIVE)
                              .values(state=EXPIRED).returning(ApiKey.id)).first()
        if won is not None:
            changed.append(row)
    return changed
