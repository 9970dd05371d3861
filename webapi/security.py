"""Authentication, authorization, rate limits, audit and security headers for every request.

How a request is checked, in one place:

1. ``authenticate_request`` (before every request): routes marked :func:`public` pass; every other
   route under ``/api/`` needs an API key (``X-API-Key`` or ``Authorization: Bearer aios_…``) or a
   JWT access token, or it is a 401 — also for routes that do not exist, so probing learns nothing.
   The principal's role is read from the database on every request, so a role change, a disabled
   user or a revoked key takes effect at once on every API process.
2. The per-principal rate limit of the route's class (read or write) is counted (429 + Retry-After).
3. :func:`policy` on each view declares which roles may call it; admin may call everything.
4. ``audit_response`` (after every request) appends one audit row for views declared with
   ``audit=...``, whatever the outcome.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_jwt_extended import JWTManager, get_current_user, get_jwt, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException, UserLookupError
from jwt.exceptions import PyJWTError

from aios.config import Settings
from aios.db import get_engine, session_scope
from aios.errors import Forbidden, TooManyRequests, Unauthorized
from aios.models import User
from aios.security import api_keys, audit
from aios.security.roles import ADMIN, AGENT, effective_key_role
from aios.security.secrets import resolve_jwt_secret
from aios.security.store import SecurityStore, create_store
from aios.security.tokens import epoch_matches, subject_user_id, token_epoch
from aios.tasks.view import Reader

logger = logging.getLogger(__name__)

View = Callable[..., Any]

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, directly (JWT) or through one of their API keys."""

    name: str
    role: str
    user_id: int
    key_id: str | None = None
    key_prefix: str | None = None
    token_claims: dict[str, Any] | None = None

    @property
    def rate_key(self) -> str:
        """Whose budget a request spends: the user's, summed over their tokens, keys and dashboard
        session (N keys must not be N times the limit). An ``agent`` key counts on its own: each
        agent host has its own, and only an admin can make one."""
        if self.key_prefix and self.role == AGENT:
            return f"key:{self.key_prefix}"
        return f"user:{self.name}"


def current_principal() -> Principal:
    principal = g.get("principal")
    if principal is None:  # pragma: no cover - authenticate_request guarantees it on non-public routes
        raise Unauthorized("authentication required")
    return principal  # type: ignore[no-any-return]


def reader() -> Reader:
    """The caller, as :mod:`aios.tasks.view` decides what of a task (a command's body) it may see."""
    principal = current_principal()
    return Reader(principal.name, is_admin=principal.role == ADMIN)


def policy(*roles: str, audit_action: str | None = None, rate: str | None = None) -> Callable[[View], View]:
    """Declare who may call a view (admin always may), what it audits, and its rate-limit class."""
    allowed = frozenset(roles) | {ADMIN}

    def decorate(view: View) -> View:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            principal = current_principal()
            if principal.role not in allowed:
                raise Forbidden(f"role {principal.role!r} may not do this (allowed: {', '.join(sorted(allowed))})")
            return view(*args, **kwargs)

        guarded.aios_roles = allowed  # type: ignore[attr-defined]
        guarded.aios_audit = audit_action  # type: ignore[attr-defined]
        guarded.aios_rate = rate  # type: ignore[attr-defined]
        return guarded

    return decorate


def public(*, audit_action: str | None = None) -> Callable[[View], View]:
    """Mark a view that needs no credentials (health probes, login, refresh)."""

    def decorate(view: View) -> View:
        view.aios_public = True  # type: ignore[attr-defined]
        view.aios_audit = audit_action  # type: ignore[attr-defined]
        return view

    return decorate


def set_audit(
    *, target: str | None = None, action: str | None = None, principal: str | None = None, **detail: Any
) -> None:
    """Let a view refine its audit row (the object it acted on, a more exact action, extra detail)."""
    if target is not None:
        g.audit_target = target
    if action is not None:
        g.audit_action = action
    if principal is not None:
        g.audit_principal = principal
    if detail:
        g.setdefault("audit_detail", {}).update(detail)


def _view() -> View | None:
    return current_app.view_functions.get(request.endpoint) if request.endpoint else None


def _settings() -> Settings:
    return current_app.extensions["aios"].settings  # type: ignore[no-any-return]


def security_store() -> SecurityStore:
    return current_app.extensions["aios_security_store"]  # type: ignore[no-any-return]


#: The answer to every refused API key, whatever the reason (see :func:`_authenticate_key`).
INVALID_KEY = "invalid, revoked or expired API key"


def client_ip() -> str | None:
    return request.remote_addr


def _authenticate_key(presented: str) -> Principal:
    with get_engine(_settings().database).connect() as connection:
        match = api_keys.authenticate(connection, presented, source_ip=client_ip())
    # One answer for every refusal: the caller learns nothing about the owner (whether they are
    # disabled, or what role they hold now); the log, which only operators read, says which it was.
    if match is None:
        raise Unauthorized(INVALID_KEY)
    if match.owner_disabled:
        logger.info("API key %s refused: its owner (user id %s) is disabled", match.prefix, match.owner_id)
        raise Unauthorized(INVALID_KEY)
    # The owner's role is read on every request too: a demotion holds at once for their keys.
    role = effective_key_role(match.key_role, match.owner_role)
    if role is None:
        logger.info(
            "API key %s refused: its role %s is not one its owner (user id %s, now %s) may act with",
            match.prefix,
            match.key_role,
            match.owner_id,
            match.owner_role,
        )
        raise Unauthorized(INVALID_KEY)
    return Principal(
        name=match.owner_name, role=role, user_id=match.owner_id, key_id=match.key_id, key_prefix=match.prefix
    )


def verify_token(*, refresh: bool = False) -> tuple[TokenUser, dict[str, Any]]:
    """The user of this request's JWT (an access token, or a refresh token) and its claims; else 401.

    A token whose user is gone, disabled, or changed since it was made (password, role: the token
    epoch, :mod:`aios.security.tokens`) gets the same answer as an unknown one: the message names no
    user id and no account state.
    """
    what = "refresh token" if refresh else "token"
    try:
        verify_jwt_in_request(refresh=refresh)
        user = get_current_user()
        claims = get_jwt()
    except UserLookupError as exc:
        raise Unauthorized(f"this {what} is no longer valid (ended by a change of its account); log in again") from exc
    except (JWTExtendedException, PyJWTError) as exc:
        raise Unauthorized(f"invalid {what}: {exc}" if str(exc) else f"invalid {what}") from exc
    return user, dict(claims)


def _authenticate_jwt() -> Principal:
    user, claims = verify_token()
    return Principal(name=user.name, role=user.role, user_id=user.id, token_claims=claims)


def authenticate() -> Principal:
    key = request.headers.get("X-API-Key")
    authorization = request.headers.get("Authorization", "")
    bearer = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
    if not key and api_keys.looks_like_key(bearer):
        key = bearer
    if key:
        return _authenticate_key(key)
    if not bearer:
        raise Unauthorized("authentication required: send a Bearer token or an X-API-Key header")
    return _authenticate_jwt()


def enforce_rate_limit(principal: Principal, view: View) -> None:
    settings = _settings().security
    route_class = getattr(view, "aios_rate", None) or ("read" if request.method in ("GET", "HEAD") else "write")
    limit = settings.rate_limit_read_per_minute if route_class == "read" else settings.rate_limit_write_per_minute
    count, retry_after = security_store().hit(f"rl:{route_class}:{principal.rate_key}", 60)
    if count > limit:
        raise TooManyRequests(
            f"rate limit of {limit} {route_class} requests per minute exceeded", retry_after_s=retry_after
        )


def authenticate_request() -> Response | None:
    g.principal = None
    if request.method == "OPTIONS" and _settings().security.cors_origins:
        return current_app.make_default_options_response()
    view = _view()
    if view is not None and getattr(view, "aios_public", False):
        return None
    if not request.path.startswith("/api/") and view is None:
        return None  # an unknown path outside the API: plain 404
    principal = authenticate()
    g.principal = principal
    if view is not None:
        enforce_rate_limit(principal, view)
    return None


def _audit_action() -> str | None:
    view = _view()
    return g.get("audit_action") or (getattr(view, "aios_audit", None) if view else None)


def _audit_target() -> str | None:
    target = g.get("audit_target")
    if target is None and request.view_args:
        target = ",".join(str(value) for value in request.view_args.values())
    return target  # type: ignore[no-any-return]


def audit_entry(status: int, **detail: Any) -> audit.Entry | None:
    """This request's audit row as plain values, as answered with ``status`` (None if the route audits
    nothing): what code outside the web layer takes to write the row in its own transaction.

    ``detail`` adds to what :func:`set_audit` recorded so far, for this row only."""
    action = _audit_action()
    return _audit_entry(action, status, detail) if action else None


def _audit_entry(action: str, status: int, detail: dict[str, Any]) -> audit.Entry:
    principal: Principal | None = g.get("principal")
    return audit.Entry(
        principal=g.get("audit_principal") or (principal.name if principal else "anonymous"),
        role=principal.role if principal else None,
        source_ip=client_ip(),
        action=action,
        target=_audit_target(),
        outcome=audit.outcome_for_status(status),
        detail={
            **(g.get("audit_detail") or {}),
            **detail,
            **({"key": principal.key_prefix} if principal and principal.key_prefix else {}),
            "status": status,
        },
    )


def audit_written(status: int) -> None:
    """Say that this request's audit row, as answered with ``status``, was written with its action (in
    the action's own transaction: the action and its row commit together, and the request spends one
    transaction instead of two; the submit path does this, :func:`aios.tasks.create.create_tasks`).
    :func:`audit_response` then writes no second row, unless the response's status is not ``status``."""
    g.audit_written_status = status


def audit_response(response: Response) -> Response:
    action = _audit_action()
    if not action:
        return response
    if g.get("audit_written_status") != response.status_code:
        try:
            entry = _audit_entry(action, response.status_code, {})
            with session_scope(_settings().database) as session:
                entry.write(session)
        except Exception:  # noqa: BLE001 - never turn a done action into an error; but say so loudly
            logger.exception("could not write the audit row for %s", action)
    principal: Principal | None = g.get("principal")
    logger.info(
        "%s by %s on %s: %d",
        action,
        principal.name if principal else "anonymous",
        _audit_target() or "-",
        response.status_code,
    )
    return response


def add_security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    origins = _settings().security.cors_origins
    origin = request.headers.get("Origin")
    if origins and origin and (origin in origins or "*" in origins):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, X-API-Key, Idempotency-Key"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PATCH, DELETE, OPTIONS"
    return response


@dataclass(frozen=True)
class TokenUser:
    """A user as their tokens carry them; ``epoch`` goes into every token made for them."""

    id: int
    name: str
    role: str
    epoch: str


def token_user(row: User) -> TokenUser:
    """What a token for ``row`` carries, its epoch as of the row read now."""
    return TokenUser(
        id=row.id, name=row.name, role=row.role, epoch=token_epoch(current_app.config["JWT_SECRET_KEY"], row)
    )


def init_security(app: Flask, settings: Settings) -> None:
    """Wire JWT, the shared store and the request hooks into ``app``; refuses a weak JWT secret."""
    security = settings.security
    app.config.update(
        JWT_SECRET_KEY=resolve_jwt_secret(security),
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],
        JWT_ENCODE_ISSUER=security.jwt_issuer,
        JWT_DECODE_ISSUER=security.jwt_issuer,
        JWT_ENCODE_AUDIENCE=security.jwt_audience,
        JWT_DECODE_AUDIENCE=security.jwt_audience,
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(seconds=security.access_token_ttl_s),
        JWT_REFRESH_TOKEN_EXPIRES=timedelta(seconds=security.refresh_token_ttl_s),
        JWT_TOKEN_LOCATION=["headers"],
    )
    jwt = JWTManager(app)
    app.extensions["aios_security_store"] = create_store(settings)

    @jwt.user_lookup_loader
    def _load_user(_header: dict[str, Any], payload: dict[str, Any]) -> TokenUser | None:
        # None -> UserLookupError -> 401. A disabled user's tokens stop working at once; a password,
        # role or any other change of the account ends the tokens made before it (the token epoch).
        user_id = subject_user_id(payload)
        if user_id is None:
            return None
        with session_scope(settings.database) as session:
            row = session.get(User, user_id)
            if row is None or row.disabled:
                return None
            user = token_user(row)
        if not epoch_matches(payload, user.epoch):
            return None
        return user

    @jwt.token_in_blocklist_loader
    def _revoked(_header: dict[str, Any], payload: dict[str, Any]) -> bool:
        # Logout revokes the access token and its session's refresh token (``rjti``): that also ends
        # every other access token refreshed from that session.
        # A token without a string ``jti`` (or with an odd ``rjti``) could never be revoked: refused.
        jti, rjti = payload.get("jti"), payload.get("rjti")
        if not isinstance(jti, str) or not jti or not isinstance(rjti, str | None):
            return True
        return security_store().is_token_revoked(jti, *([rjti] if rjti else []))

    app.before_request(authenticate_request)
    app.after_request(audit_response)
    app.after_request(add_security_headers)


def check_every_view_declares_access(app: Flask) -> None:
    """Fail at start if a route forgot its policy: access is declared per route, never defaulted."""
    missing = [
        endpoint
        for endpoint, view in app.view_functions.items()
        if endpoint != "static" and not getattr(view, "aios_public", False) and not hasattr(view, "aios_roles")
    ]
    if missing:
        raise RuntimeError(f"routes without an access policy: {', '.join(sorted(missing))}")
