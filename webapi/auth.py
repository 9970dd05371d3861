"""/api/v1/auth: log in (token), refresh, log out."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request
from flask_jwt_extended import create_access_token, create_refresh_token, decode_token
from sqlalchemy import select

from aios.db import session_scope
from aios.errors import BadRequest, TooManyRequests, Unauthorized, ValidationFailed
from aios.models import User
from aios.security.passwords import verify_password
from aios.security.roles import ROLES
from aios.security.tokens import EPOCH_CLAIM
from aios.timeutil import utcnow
from webapi.context import ctx
from webapi.requests import json_body
from webapi.security import (
    TokenUser,
    client_ip,
    current_principal,
    policy,
    public,
    security_store,
    set_audit,
    token_user,
    verify_token,
)

bp = Blueprint("auth", __name__, url_prefix="/api/v1/auth")


def _credentials() -> tuple[str, str]:
    if request.is_json:
        body = json_body()
        if not isinstance(body, dict):
            raise ValidationFailed("the body must be a JSON object", field="body")
    else:
        body = request.form
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not username:
        raise ValidationFailed("username: required", field="username")
    if not isinstance(password, str) or not password:
        raise ValidationFailed("password: required", field="password")
    return username[:64], password


def _claims(user: TokenUser) -> dict[str, Any]:
    """What every token carries besides the standard claims: the role and name (for clients to read;
    the API reads both from the database) and the user's token epoch (a change of the account ends it)."""
    return {"role": user.role, "name": user.name, EPOCH_CLAIM: user.epoch}


def _tokens(user: TokenUser) -> dict[str, Any]:
    claims = _claims(user)
    refresh = create_refresh_token(identity=str(user.id), additional_claims=claims)
    refresh_jti = decode_token(refresh)["jti"]
    access = create_access_token(identity=str(user.id), additional_claims={**claims, "rjti": refresh_jti})
    return {
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": ctx().settings.security.access_token_ttl_s,
    }


def count_login_attempt() -> None:
    """Count a login attempt from the client's address; 429 past rate_limit_login_per_minute."""
    count, retry_after = security_store().hit(f"login-ip:{client_ip()}", 60)
    if count > ctx().settings.security.rate_limit_login_per_minute:
        raise TooManyRequests("too many login attempts from this address", retry_after_s=retry_after)


def verify_login(username: str, password: str) -> TokenUser:
    """The user these credentials name, or Unauthorized; a locked username is a 429.

    Shared by the token endpoint and the dashboard's sign-in form, so both count failures and lock
    a username the same way (``login_max_failures`` within ``login_lockout_s``).
    """
    security = ctx().settings.security
    store = security_store()
    locked, locked_for = store.peek(f"login-lock:{username}")
    if locked:
        raise TooManyRequests(
            f"user {username!r} is locked after {security.login_max_failures} failed logins", retry_after_s=locked_for
        )
    with session_scope(ctx().settings.database) as session:
        user = session.scalars(select(User).where(User.name == username)).one_or_none()
        ok = verify_password(password, user.password_hash if user else None) and user is not None and not user.disabled
        found = token_user(user) if ok and user else None
    if found is None:
        failures, _ = store.hit(f"login-fail:{username}", security.login_lockout_s)
        if failures >= security.login_max_failures:
            # The lock lasts login_lockout_s from this failure (not from the first one of the window).
            store.hit(f"login-lock:{username}", security.login_lockout_s)
            store.clear(f"login-fail:{username}")
        raise Unauthorized("wrong username or password")
    store.clear(f"login-fail:{username}")
    return found


@bp.post("/token")
@public(audit_action="auth.login")
def token() -> Any:
    """Exchange a username and password (JSON or form) for an access and a refresh token."""
    count_login_attempt()
    username, password = _credentials()
    set_audit(target=username, principal=username)
    return jsonify(_tokens(verify_login(username, password)))


@bp.post("/refresh")
@public()
def refresh() -> Any:
    """A new access token for a valid refresh token (sent as ``Authorization: Bearer <refresh>``)."""
    user, claims = verify_token(refresh=True)
    access = create_access_token(identity=str(user.id), additional_claims={**_claims(user), "rjti": claims["jti"]})
    return jsonify(
        {"access_token": access, "token_type": "Bearer", "expires_in": ctx().settings.security.access_token_ttl_s}
    )


@bp.post("/logout")
@policy(*ROLES, audit_action="auth.logout")
def logout() -> Any:
    """Revoke this access token and the refresh token issued with it, on every API process."""
    principal = current_principal()
    claims = principal.token_claims
    if claims is None:
        raise BadRequest("logout ends a token session; an API key is revoked with POST /api/v1/keys/{id}/revoke")
    store = security_store()
    now = int(utcnow().timestamp())
    store.revoke_token(claims["jti"], int(claims["exp"]) - now + 1)
    if claims.get("rjti"):
        store.revoke_token(claims["rjti"], ctx().settings.security.refresh_token_ttl_s)
    set_audit(target=principal.name)
    return jsonify({"revoked": True})
