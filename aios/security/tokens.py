"""What a user's access and refresh tokens say about them, and when a change of the account ends them.

A JWT is valid until it expires unless something ends it. Logout ends one session (its token ids are
revoked in :mod:`aios.security.store`). A password change, disabling the user and a role change end
*every* token of that user: each token carries :data:`EPOCH_CLAIM`, the user's **token epoch** when
it was made — a fingerprint of the row's ``updated_at`` (which every change of the account moves),
role and password hash — and each request, which reads the user's row anyway (the role comes from the
database, not the token), refuses a token whose epoch is no longer the row's.

Why no column of its own: the row is already read on every token request, so the check costs no
query; it lives in the database, so it holds on every API process at once and survives a Redis
restart (as revoked token ids do); and a password hash or role changed by any path, even by hand in
SQL, still ends the tokens. The fingerprint is keyed with the JWT secret, so a token, which its holder
can read, says nothing about the hash (as the dashboard's session cookie does, ``webapi/ui_auth.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime
from typing import Any, Protocol

from aios.timeutil import as_utc

#: The claim that carries the token epoch. A token without it (made before this check existed) is refused.
EPOCH_CLAIM = "uv"
_LABEL = b"aios-token-epoch-v1"
#: ``users.id`` is a 32-bit integer: a ``sub`` that is not one names nobody (and must not reach the query).
_USER_ID = re.compile(r"[1-9][0-9]{0,9}")
_MAX_USER_ID = 2**31 - 1


class AccountRow(Protocol):
    id: int
    role: str
    password_hash: str
    updated_at: datetime


def token_epoch(secret: str, user: AccountRow) -> str:
    """The user's token epoch: changes whenever their password, role or anything else of the account does."""
    changed = as_utc(user.updated_at)
    stamp = changed.isoformat(timespec="microseconds") if changed is not None else ""
    message = f"{user.id}|{stamp}|{user.role}|{user.password_hash}".encode()
    key = hmac.new(secret.encode("utf-8"), _LABEL, hashlib.sha256).digest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def epoch_matches(claims: dict[str, Any], current: str) -> bool:
    """Whether a token's claims carry the user's current epoch (a missing or odd claim does not)."""
    presented = claims.get(EPOCH_CLAIM)
    return isinstance(presented, str) and hmac.compare_digest(presented, current)


def subject_user_id(claims: dict[str, Any]) -> int | None:
    """The user id a token's ``sub`` names, or None when it is not one (a list, a word, ``"٣"``, 2**40).

    Only tokens signed with the deployment's key get here, but an odd ``sub`` must still be a 401, not
    a 500 from ``int()`` or from the database refusing an out-of-range id.
    """
    sub = claims.get("sub")
    if not isinstance(sub, str) or not _USER_ID.fullmatch(sub):
        return None
    value = int(sub)
    return value if value <= _MAX_USER_ID else None
