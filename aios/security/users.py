"""Users: create, change role, disable, set password. Callers commit."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aios.errors import Conflict, NotFound, ValidationFailed
from aios.models import User
from aios.security.passwords import hash_password
from aios.security.roles import ROLES
from aios.timeutil import utcnow

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def check_role(role: str, *, field: str = "role") -> str:
    if role not in ROLES:
        raise ValidationFailed(f"{field}: must be one of {', '.join(ROLES)}", field=field)
    return role


def create_user(session: Session, name: str, password: str, role: str, *, bcrypt_cost: int) -> User:
    if not NAME_PATTERN.match(name):
        raise ValidationFailed("name: 1-64 characters of letters, digits and . _ @ -", field="name")
    check_role(role)
    password_hash = hash_password(password, cost=bcrypt_cost)
    if session.scalars(select(User.id).where(User.name == name)).first() is not None:
        raise Conflict(f"user {name!r} already exists", field="name")
    now = utcnow()
    user = User(name=name, password_hash=password_hash, role=role, disabled=False, created_at=now, updated_at=now)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise NotFound(f"no user named {name!r}", field="name")
    return user


def count_users(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(User)) or 0)
