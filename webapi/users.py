"""/api/v1/users: accounts (admin), and /users/me."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from aios.db import session_scope
from aios.errors import Conflict
from aios.models import User
from aios.security.passwords import hash_password
from aios.security.roles import ADMIN, ROLES
from aios.security.users import check_role, create_user, get_user
from aios.timeutil import isoformat, utcnow
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import current_principal, policy, set_audit

bp = Blueprint("users", __name__, url_prefix="/api/v1/users")


def user_to_dict(user: User) -> dict[str, Any]:
    return {
        "name": user.name,
        "role": user.role,
        "disabled": user.disabled,
        "created_at": isoformat(user.created_at),
        "updated_at": isoformat(user.updated_at),
    }


class CreateUser(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    password: str
    role: str


class UpdateUser(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str | None = None
    disabled: bool | None = None
    password: str | None = None


@bp.get("")
@policy(ADMIN)
def index() -> Any:
    with session_scope(ctx().settings.database) as session:
        return jsonify({"users": [user_to_dict(u) for u in session.scalars(select(User).order_by(User.name))]})


@bp.get("/me")
@policy(*ROLES)
def me() -> Any:
    principal = current_principal()
    return jsonify(
        {
            "name": principal.name,
            "role": principal.role,
            "via": "key" if principal.key_id else "token",
            "key_prefix": principal.key_prefix,
        }
    )


@bp.post("")
@policy(ADMIN, audit_action="user.create")
def create() -> Any:
    body = validate(CreateUser, json_body())
    set_audit(target=body.name, role=body.role)
    with session_scope(ctx().settings.database) as session:
        user = create_user(
            session, body.name, body.password, body.role, bcrypt_cost=ctx().settings.security.bcrypt_cost
        )
        return jsonify(user_to_dict(user)), 201


@bp.patch("/<name>")
@policy(ADMIN, audit_action="user.update")
def update(name: str) -> Any:
    """Change a user's role, disable or enable them, or set a new password.

    Any change moves ``updated_at``, and with it the user's token epoch: every access and refresh
    token they hold stops working on every API process (``aios.security.tokens``); they log in again.
    """
    body = validate(UpdateUser, json_body())
    changes = body.model_dump(exclude_none=True)
    set_audit(target=name, changed=sorted(changes))
    if set(changes) == {"role"}:
        set_audit(action="user.role_change", role=body.role)
    elif set(changes) == {"disabled"}:
        set_audit(action="user.disable" if body.disabled else "user.enable")
    elif set(changes) == {"password"}:
        set_audit(action="user.password_change")
    with session_scope(ctx().settings.database) as session:
        user = get_user(session, name)
        if body.role is not None:
            user.role = check_role(body.role)
        if body.disabled is not None:
            user.disabled = body.disabled
        if body.password is not None:
            user.password_hash = hash_password(body.password, cost=ctx().settings.security.bcrypt_cost)
        user.updated_at = utcnow()
        session.flush()
        active_admins = session.scalar(
            select(func.count()).select_from(User).where(User.role == ADMIN, User.disabled.is_(False))
        )
        if not active_admins:
            raise Conflict(
                "this would leave no active admin; promote or enable another admin first",
                field="role" if body.role is not None else "disabled",
            )
        return jsonify(user_to_dict(user))
