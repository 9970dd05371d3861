"""/api/v1/keys: create (shown once), list, revoke, activate, rotate, delete."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, jsonify, request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from aios.db import session_scope
from aios.errors import Conflict, Forbidden, NotFound
from aios.models import ApiKey
from aios.security import api_keys
from aios.security.roles import ADMIN, OPERATOR, VIEWER, can_grant
from aios.timeutil import as_utc, isoformat, utcnow
from webapi.context import ctx
from webapi.requests import json_body, validate
from webapi.security import Principal, current_principal, policy, set_audit

bp = Blueprint("keys", __name__, url_prefix="/api/v1/keys")

KEY_USERS = (VIEWER, OPERATOR)


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=128)
    role: str
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class RotateKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: How long the old key keeps working; default [security] key_rotation_grace_s, at most 7 days.
    grace_s: int | None = Field(None, ge=0, le=7 * 86_400)


def key_to_dict(row: ApiKey, *, owner: str | None = None) -> dict[str, Any]:
    now = utcnow()
    expires_at = as_utc(row.expires_at)
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "role": row.role,
        "owner": owner if owner is not None else (row.owner.name if row.owner else None),
        "state": row.state if row.state != api_keys.ACTIVE or expires_at is None or expires_at > now else "EXPIRED",
        "expires_at": isoformat(row.expires_at),
        "rotated_to": row.rotated_to,
        "created_at": isoformat(row.created_at),
        "revoked_at": isoformat(row.revoked_at),
        "last_used_at": isoformat(row.last_used_at),
        "last_used_ip": row.last_used_ip,
    }


def _own_key(session: Session, principal: Principal, key_id: str) -> ApiKey:
    """The key, if the caller may manage it: its owner or an admin. Others get 404 (no probing)."""
    row = session.get(ApiKey, key_id)
    if row is None or (principal.role != ADMIN and row.owner_id != principal.user_id):
        raise NotFound(f"no API key with id {key_id!r}", field="id")
    return row


@bp.post("")
@policy(*KEY_USERS, audit_action="key.create")
def create() -> Any:
    """Create a key for the caller. The plaintext is in this answer only; it is never stored."""
    principal = current_principal()
    body = validate(CreateKey, json_body())
    set_audit(role=body.role, name=body.name)
    if not can_grant(principal.role, body.role):
        raise Forbidden(f"a {principal.role} cannot create a key with role {body.role!r}")
    expires_at = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    cap = ctx().settings.security.max_keys_per_user
    with session_scope(ctx().settings.database) as session:
        # Rate limits are per user, so more keys buy no more requests; the cap keeps the table (and
        # what an admin must review) bounded too. Admins are not capped: they can make users anyway.
        if cap and principal.role != ADMIN and api_keys.count_usable(session, principal.user_id, utcnow()) >= cap:
            raise Conflict(
                f"you hold security.max_keys_per_user ({cap}) usable API keys already; "
                "revoke or delete one you no longer use (POST /api/v1/keys/{id}/revoke)"
            )
        new = api_keys.generate(
            session, name=body.name, role=body.role, owner_id=principal.user_id, expires_at=expires_at
        )
        set_audit(target=new.row.id, prefix=new.row.prefix)
        return jsonify({**key_to_dict(new.row, owner=principal.name), "key": new.plaintext}), 201


@bp.get("")
@policy(*KEY_USERS)
def index() -> Any:
    """Every key (admin) or the caller's own keys; never a secret or a hash."""
    principal = current_principal()
    with session_scope(ctx().settings.database) as session:
        statement = select(ApiKey).order_by(ApiKey.created_at.desc())
        if principal.role != ADMIN:
            statement = statement.where(ApiKey.owner_id == principal.user_id)
        return jsonify({"keys": [key_to_dict(row) for row in session.scalars(statement)]})


@bp.post("/<key_id>/revoke")
@policy(*KEY_USERS, audit_action="key.revoke")
def revoke(key_id: str) -> Any:
    principal = current_principal()
    with session_scope(ctx().settings.database) as session:
        row = _own_key(session, principal, key_id)
        if row.state == api_keys.REVOKED:
            raise Conflict("the key is already revoked", state=row.state)
        row.state, row.revoked_at = api_keys.REVOKED, utcnow()
        session.flush()
        return jsonify(key_to_dict(row))


@bp.post("/<key_id>/activate")
@policy(ADMIN, audit_action="key.activate")
def activate(key_id: str) -> Any:
    """Re-activate a revoked key that has not expired."""
    principal = current_principal()
    with session_scope(ctx().settings.database) as session:
        row = _own_key(session, principal, key_id)
        if row.state != api_keys.REVOKED:
            raise Conflict("only a revoked key can be activated", state=row.state)
        expires_at = as_utc(row.expires_at)
        if expires_at is not None and expires_at <= utcnow():
            raise Conflict("the key has expired; create a new one", state="EXPIRED")
        row.state, row.revoked_at = api_keys.ACTIVE, None
        session.flush()
        return jsonify(key_to_dict(row))


@bp.post("/<key_id>/rotate")
@policy(*KEY_USERS, audit_action="key.rotate")
def rotate(key_id: str) -> Any:
    """A new key with the same name, role and expiry; the old one works for a grace period more."""
    principal = current_principal()
    # The body is optional: a bare POST (no content type, no body) rotates with the default grace.
    has_body = bool(request.content_type) or bool(request.get_data(cache=True))
    body = validate(RotateKey, json_body() if has_body else {})
    grace_s = ctx().settings.security.key_rotation_grace_s if body.grace_s is None else body.grace_s
    with session_scope(ctx().settings.database) as session:
        old = _own_key(session, principal, key_id)
        now = utcnow()
        if not api_keys.is_usable(old, now):
            raise Conflict("only an active, unexpired key can be rotated", state=old.state)
        new = api_keys.generate(session, name=old.name, role=old.role, owner_id=old.owner_id, expires_at=old.expires_at)
        grace_end = now + timedelta(seconds=grace_s)
        old_expiry = as_utc(old.expires_at)
        old.expires_at = grace_end if old_expiry is None or grace_end < old_expiry else old_expiry
        old.rotated_to = new.row.id
        session.flush()
        set_audit(new_key=new.row.id, grace_s=grace_s)
        answer = {**key_to_dict(new.row), "key": new.plaintext, "old_key_expires_at": isoformat(old.expires_at)}
        return jsonify(answer), 201


@bp.delete("/<key_id>")
@policy(*KEY_USERS, audit_action="key.delete")
def delete(key_id: str) -> Any:
    principal = current_principal()
    with session_scope(ctx().settings.database) as session:
        row = _own_key(session, principal, key_id)
        session.delete(row)
    return jsonify({"deleted": key_id})
