"""Browser sessions for the dashboard (/ui): sign-in state, CSRF tokens, and the per-view access check.

The API's own layer (``webapi.security``) wants an API key or a JWT on every request; a browser has
neither, so every /ui view is declared ``@public`` there and checked here instead, by
:func:`ui_view`:

* The session is Flask's signed cookie (``aios_ui``, path ``/ui``, HttpOnly, SameSite=Lax, Secure over
  HTTPS), signed with a key derived from the JWT secret. It holds the user id, a session id, a CSRF
  token, the sign-in time and a fingerprint of the password hash — never a role.
* Every request re-reads the user from the database: a disabled user, a deleted one, or a changed
  password ends the session at once; a role change applies at once. Sign-out revokes the session id
  in the shared security store, so a copied cookie dies too, on every API process. A session lasts
  at most ``security.refresh_token_ttl_s`` after sign-in (as long as an API login can be refreshed).
* Every POST must carry the session's CSRF token (hidden field ``csrf_token``): 403 otherwise.
* The user's role is checked against the view's roles (admin always passes), the per-user rate limit
  of the API applies, and audited actions go through the API's audit hook (``g.principal`` is set).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import Flask, Response, current_app, g, has_request_context, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

from aios.db import session_scope
from aios.errors import Forbidden
from aios.models import User
from aios.security.roles import ADMIN, OPERATOR, VIEWER
from webapi.context import ctx
from webapi.security import Principal, enforce_rate_limit, public, security_store, set_audit

View = Callable[..., Any]

#: The roles that may sign in to the dashboard (an ``agent`` account is for agents' API keys only).
HUMAN_ROLES = (VIEWER, OPERATOR, ADMIN)
CSRF_FIELD = "csrf_token"
COOKIE_NAME = "aios_ui"
COOKIE_PATH = "/ui"
_SECRET_LABEL = b"aios-ui-session-v1"


class UiSessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, scoped to /ui; Secure whenever the request came over HTTPS."""

    salt = "aios-ui-session"

    def get_cookie_name(self, app: Flask) -> str:
        return COOKIE_NAME

    def get_cookie_path(self, app: Flask) -> str:
        return COOKIE_PATH

    def get_cookie_httponly(self, app: Flask) -> bool:
        return True

    def get_cookie_samesite(self, app: Flask) -> str:
        return "Lax"

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(has_request_context() and request.is_secure)


def session_secret(jwt_secret: str) -> str:
    """The cookie signing key: an HMAC of the JWT secret under a label of its own, so neither key
    can stand in for the other (a session cookie is no token, a token no cookie)."""
    return hmac.new(jwt_secret.encode("utf-8"), _SECRET_LABEL, hashlib.sha256).hexdigest()


def init_ui_sessions(app: Flask) -> None:
    """Give ``app`` the session key and interface; called once when the ui blueprint is registered."""
    app.secret_key = session_secret(app.config["JWT_SECRET_KEY"])
    app.session_interface = UiSessionInterface()


@dataclass(frozen=True)
class UiUser:
    id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may(self, *roles: str) -> bool:
        """Whether this user holds one of ``roles`` (admin holds them all): what templates ask before
        showing a button; the view it posts to checks again."""
        return self.role == ADMIN or self.role in roles

    def may_change(self, owner: str | None) -> bool:
        """Operators change their own tasks and schedules; admins any (as in the API)."""
        return self.role == ADMIN or (self.role == OPERATOR and owner == self.name)


def _revocation_key(sid: str) -> str:
    return f"ui:{sid}"


def csrf_token() -> str:
    """The session's CSRF token, made on first use (the sign-in form has one before anyone signs in)."""
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return str(token)


def check_csrf() -> None:
    sent = request.form.get(CSRF_FIELD, "")
    expected = session.get("csrf") or ""
    if not expected or not sent or not hmac.compare_digest(str(sent), str(expected)):
        raise Forbidden("the form's CSRF token is missing or does not match this session; reload the page")


def sign_in(user_id: int, password_hash: str) -> None:
    """Start a new session (a fresh id and CSRF token: nothing from before sign-in carries over)."""
    session.clear()
    session.update(
        uid=user_id,
        sid=secrets.token_urlsafe(24),
        csrf=secrets.token_urlsafe(32),
        iat=int(time.time()),
        pwv=password_fingerprint(password_hash),
    )


def sign_out() -> None:
    sid = session.get("sid")
    if sid:
        security_store().revoke_token(_revocation_key(str(sid)), ctx().settings.security.refresh_token_ttl_s)
    session.clear()


def password_fingerprint(password_hash: str) -> str:
    """Changes when the password does (ending older sessions); keyed, so the cookie, which its holder
    can read, says nothing about the hash."""
    key = str(current_app.secret_key).encode()
    return hmac.new(key, password_hash.encode(), hashlib.sha256).hexdigest()[:24]


def signed_in_user() -> UiUser | None:
    """The user of this request's session, re-read from the database; None (and the session is
    cleared) if there is none or it no longer holds."""
    if "ui_user" in g:
        return g.ui_user  # type: ignore[no-any-return]
    g.ui_user = None
    uid, sid, iat = session.get("uid"), session.get("sid"), session.get("iat")
    if not uid or not sid or not isinstance(iat, int):
        return None
    settings = ctx().settings
    if time.time() - iat > settings.security.refresh_token_ttl_s or security_store().is_token_revoked(
        _revocation_key(str(sid))
    ):
        session.clear()
        return None
    with session_scope(settings.database) as db:
        row = db.get(User, int(uid))
        valid = (
            row is not None
            and not row.disabled
            and row.role in HUMAN_ROLES
            and hmac.compare_digest(str(session.get("pwv", "")), password_fingerprint(row.password_hash))
        )
        user = UiUser(id=row.id, name=row.name, role=row.role) if valid and row is not None else None
    if user is None:
        session.clear()
        return None
    g.ui_user = user
    return user


def ui_view(*roles: str, audit: str | None = None, fragment: bool = False) -> Callable[[View], View]:
    """Declare a dashboard view: who may see it (admin always may) and the audit action of its POST.

    Not signed in: a redirect to the sign-in page (a ``fragment`` answers 401, for the script that
    polls it). Wrong role or a bad CSRF token: 403. The view is ``@public`` for the API-key layer.
    """
    allowed = frozenset(roles) | {ADMIN}

    def decorate(view: View) -> View:
        @wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            user = signed_in_user()
            if user is None:
                if fragment:
                    return Response("sign in again", status=401, mimetype="text/plain")
                target = request.full_path if request.method == "GET" else None
                return redirect(url_for("ui.login", next=target.rstrip("?") if target else None), code=303)
            principal = Principal(name=user.name, role=user.role, user_id=user.id)
            g.principal = principal
            if audit:
                set_audit(action=audit, via="ui")
            enforce_rate_limit(principal, guarded)
            if user.role not in allowed:
                raise Forbidden(f"role {user.role!r} may not do this (allowed: {', '.join(sorted(allowed))})")
            if request.method == "POST":
                check_csrf()
            return view(*args, **kwargs)

        guarded.aios_ui_roles = allowed  # type: ignore[attr-defined]
        return public()(guarded)

    return decorate


def actor() -> str:
    """How the ledger names a dashboard user in task events."""
    user = signed_in_user()
    return f"ui:{user.name}" if user else "ui:anonymous"
