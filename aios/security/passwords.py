"""Password hashing with bcrypt.

bcrypt only looks at the first 72 bytes, and bcrypt >= 5 raises on longer input instead of silently
truncating; AIOS refuses passwords outside 8-72 bytes up front, with a 422, never a 500.
"""

from __future__ import annotations

import bcrypt

from aios.errors import ValidationFailed

MIN_PASSWORD_BYTES = 8
MAX_PASSWORD_BYTES = 72
#: A real bcrypt hash to compare against when the user does not exist, so a login for an unknown
#: name costs as much time as one for a known name (no user enumeration by timing).
_DUMMY_HASH = bcrypt.hashpw(b"aios-no-such-user", bcrypt.gensalt(rounds=12))


def check_password_policy(password: str, *, field: str = "password") -> bytes:
    encoded = password.encode("utf-8")
    if not MIN_PASSWORD_BYTES <= len(encoded) <= MAX_PASSWORD_BYTES:
        raise ValidationFailed(
            f"{field}: must be {MIN_PASSWORD_BYTES}-{MAX_PASSWORD_BYTES} bytes in UTF-8 (got {len(encoded)})",
            field=field,
        )
    return encoded


def hash_password(password: str, *, cost: int) -> str:
    return bcrypt.hashpw(check_password_policy(password), bcrypt.gensalt(rounds=cost)).decode()


def verify_password(password: str, password_hash: str | None) -> bool:
    encoded = password.encode("utf-8")
    if not 1 <= len(encoded) <= MAX_PASSWORD_BYTES:
        bcrypt.checkpw(b"x", _DUMMY_HASH)
        return False
    if password_hash is None:
        bcrypt.checkpw(encoded, _DUMMY_HASH)
        return False
    return bcrypt.checkpw(encoded, password_hash.encode())
