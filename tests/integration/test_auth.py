"""Authentication end to end: who may call the API, with what, and for how long.

Runs the real Flask app (and, where a process is the point, ``aios api`` and ``aios users``) against
the real PostgreSQL and Redis. Covers: every /api/v1 route needs credentials; login, refresh and
logout; forged, tampered and expired tokens; the JWT signing key's strength; users, passwords,
disabling and role changes; brute-force lockout and the per-IP login limit; security headers.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest

from aios.errors import ConfigError
from tests.conftest import REPO_ROOT, TEST_JWT_SECRET, authorize, make_user

pytestmark = pytest.mark.integration

TASKS = "/api/v1/tasks"
TOKEN = "/api/v1/auth/token"
REFRESH = "/api/v1/auth/refresh"
LOGOUT = "/api/v1/auth/logout"
USERS = "/api/v1/users"
#: The only routes under /api/v1 that answer without credentials (the OpenAPI document holds no data).
PUBLIC_API_ROUTES = {TOKEN, REFRESH, "/api/v1/openapi.json"}

_ip_counter = itertools.count(1)


# --------------------------------------------------------------------------- helpers


def fresh_ip() -> str:
    """A client address of its own, so the per-IP login limit of one test never meets another's."""
    n = next(_ip_counter) + (os.getpid() % 200) * 1000
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unique_name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:10]}"


def assert_unauthorized(response: Any) -> dict[str, Any]:
    """401 in the one JSON error shape, with a WWW-Authenticate challenge."""
    text = response.get_data(as_text=True)
    assert response.status_code == 401, text
    assert response.mimetype == "application/json", response.headers
    body = json.loads(text)
    assert body["error"] == "unauthorized", body
    assert isinstance(body["message"], str) and body["message"], body
    assert response.headers.get("WWW-Authenticate", "").startswith("Bearer"), response.headers
    return body


def login(web: Any, username: str, password: str, *, form: bool = False) -> Any:
    if form:
        return web.post(TOKEN, data={"username": username, "password": password})
    return web.post(TOKEN, json={"username": username, "password": password})


def tokens_for(web: Any, username: str, password: str) -> tuple[str, str]:
    response = login(web, username, password)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json["access_token"], response.json["refresh_token"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def current_epoch(stack: Any, user_id: int) -> str:
    """The user's token epoch now, as the API computes it (every token it makes carries it)."""
    from aios.db import session_scope
    from aios.models import User
    from aios.security.tokens import token_epoch

    with session_scope(stack.settings.database) as session:
        return token_epoch(TEST_JWT_SECRET, session.get(User, user_id))


def claims_for(stack: Any, user_id: int, *, token_type: str = "access", **overrides: Any) -> dict[str, Any]:
    """The claims flask-jwt-extended puts in a token of this deployment (and the user's token
    epoch), as plain JSON numbers."""
    now = datetime.now(UTC)
    security = stack.settings.security
    claims: dict[str, Any] = {
        "fresh": False,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "jti": str(uuid.uuid4()),
        "type": token_type,
        "sub": str(user_id),
        "iss": security.jwt_issuer,
        "aud": security.jwt_audience,
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "uv": current_epoch(stack, user_id),
    }
    claims.update(overrides)
    return claims


def forge(claims: dict[str, Any], *, secret: str = TEST_JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def user_id(stack: Any, name: str) -> int:
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import User

    with session_scope(stack.settings.database) as session:
        return int(session.scalars(select(User.id).where(User.name == name)).one())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(
    args: list[str], env: dict[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def settings_with_security(stack: Any, **changes: Any) -> Any:
    """A copy of the session's settings with some [security] values replaced (None allowed)."""
    settings = stack.settings
    return settings.model_copy(update={"security": settings.security.model_copy(update=changes)})


@pytest.fixture()
def web(api_app: Any) -> Any:
    """An unauthenticated test client with a client address of its own."""
    test_client = api_app.test_client()
    test_client.environ_base["REMOTE_ADDR"] = fresh_ip()
    return test_client


@pytest.fixture()
def app_with(stack: Any, celery_client: Any) -> Callable[..., Any]:
    """Build the real app on a copy of the settings with some [security] values changed."""
    from webapi.app import create_app

    def build(**security: Any) -> Any:
        app = create_app(stack.override(security=security).settings, celery_client)
        test_client = app.test_client()
        test_client.environ_base["REMOTE_ADDR"] = fresh_ip()
        return test_client

    return build


# --------------------------------------------------------------------------- 1. no credentials, no API


def api_routes(app: Any) -> list[tuple[str, str, str]]:
    """(method, path with dummy values for its parameters, rule) for every /api/v1 route of ``app``."""
    routes = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1"):
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", lambda m: f"dummy-{m.group(1)}", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((method, path, rule.rule))
    return routes


def test_every_api_route_answers_401_without_credentials(api_app, anonymous):
    # Given every route of the real app under /api/v1, read from its URL map (a new route is covered
    # automatically), except the two public ones that exchange credentials for tokens
    routes = [(m, p, r) for m, p, r in api_routes(api_app) if r not in PUBLIC_API_ROUTES]
    assert len(routes) >= 15, routes
    assert ("POST", TASKS, TASKS) in routes and ("POST", LOGOUT, LOGOUT) in routes
    failures = []
    for method, path, _rule in routes:
        # When it is called with no credentials (and a plausible JSON body)
        response = anonymous.open(path, method=method, json={"type": "echo", "name": "x", "role": "admin"})
        # Then 401 in the JSON error shape, before any body is looked at
        try:
            assert_unauthorized(response)
        except AssertionError as exc:
            failures.append(f"{method} {path}: {exc}")
    assert not failures, "\n".join(failures)


def test_only_login_refresh_and_the_openapi_document_are_public_under_api_v1(api_app):
    # Given the views of the real app
    # When the ones under /api/v1 that need no credentials are listed
    public = {
        rule.rule
        for rule in api_app.url_map.iter_rules()
        if rule.rule.startswith("/api/") and getattr(api_app.view_functions[rule.endpoint], "aios_public", False)
    }
    # Then they are exactly login, refresh and the document (anything else public must be a deliberate change)
    assert public == PUBLIC_API_ROUTES


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PUT"])
def test_an_unknown_api_route_answers_401_without_credentials(anonymous, method):
    # Given a path under /api/v1 that no route serves
    # When it is called without credentials
    # Then 401, not 404: an anonymous prober cannot tell which routes exist
    assert_unauthorized(anonymous.open("/api/v1/nope", method=method))
    assert_unauthorized(anonymous.open("/api/v2/tasks", method=method))


def test_an_unknown_api_route_answers_404_with_credentials(client):
    response = client.get("/api/v1/nope")
    assert response.status_code == 404
    assert response.json["error"] == "not_found"


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_the_health_probes_answer_without_credentials(anonymous, path):
    # Given no credentials / When a probe is called / Then it answers 200
    response = anonymous.get(path)
    assert response.status_code == 200, response.json
    assert response.json["status"] in ("ok", "ready")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Bearer a.b.c"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Token abc"},
        {"X-API-Key": "nope"},
        {"X-API-Key": "aios_0000000000_" + "A" * 32},
        {"X-API-Key": "aios__"},
        {"Authorization": "Bearer aios_0000000000_" + "A" * 32},
    ],
    ids=lambda h: json.dumps(h)[:50],
)
def test_garbage_credentials_are_a_401(anonymous, headers):
    # Given credentials that are malformed, of an unknown scheme, or a key that does not exist
    # When a protected route is called with them / Then 401 in the JSON error shape, never a 500
    assert_unauthorized(anonymous.get(TASKS, headers=headers))


# --------------------------------------------------------------------------- 2. login, refresh, logout


@pytest.mark.parametrize("form", [False, True], ids=["json", "form"])
def test_login_gives_an_access_and_a_refresh_token_and_the_access_token_works(stack, web, form):
    # Given a viewer with a password
    viewer = make_user(stack, "viewer")
    # When they log in (JSON or form body)
    response = login(web, viewer.user, viewer.password, form=form)
    # Then 200 with an access and a refresh token
    assert response.status_code == 200, response.json
    body = response.json
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == stack.settings.security.access_token_ttl_s
    access, refresh = body["access_token"], body["refresh_token"]
    assert access != refresh
    # And the access token carries our issuer, audience and type, signed HS256
    assert jwt.get_unverified_header(access)["alg"] == "HS256"
    claims = jwt.decode(access, TEST_JWT_SECRET, algorithms=["HS256"], audience="aios-api", issuer="aios")
    assert claims["type"] == "access" and claims["sub"] == str(user_id(stack, viewer.user))
    # And it opens the API, as that user
    listed = web.get(TASKS, headers=bearer(access))
    assert listed.status_code == 200, listed.json
    me = web.get(f"{USERS}/me", headers=bearer(access)).json
    assert me == {"name": viewer.user, "role": "viewer", "via": "token", "key_prefix": None}


def test_a_wrong_password_and_an_unknown_user_get_the_same_401(stack, web):
    # Given a real user
    viewer = make_user(stack, "viewer")
    # When one login has a wrong password and another names no user
    wrong = login(web, viewer.user, "not-the-password")
    unknown = login(web, unique_name("ghost"), "not-the-password")
    # Then both are 401 with the same message: a login does not tell which users exist
    assert assert_unauthorized(wrong)["message"] == assert_unauthorized(unknown)["message"]


def test_a_refresh_token_gives_a_new_access_token_that_works(stack, web):
    # Given a logged-in operator
    operator = make_user(stack, "operator")
    access, refresh = tokens_for(web, operator.user, operator.password)
    # When the refresh token is exchanged
    response = web.post(REFRESH, headers=bearer(refresh))
    # Then a new, different access token comes back and works
    assert response.status_code == 200, response.json
    renewed = response.json["access_token"]
    assert renewed != access
    assert jwt.decode(renewed, TEST_JWT_SECRET, algorithms=["HS256"], audience="aios-api")["type"] == "access"
    assert web.get(TASKS, headers=bearer(renewed)).status_code == 200


def test_an_access_token_cannot_be_used_to_refresh(stack, web):
    operator = make_user(stack, "operator")
    access, _refresh = tokens_for(web, operator.user, operator.password)
    # Given an access token / When it is sent to /refresh / Then 401: only a refresh token refreshes
    assert_unauthorized(web.post(REFRESH, headers=bearer(access)))


def test_a_refresh_token_used_as_an_access_token_is_a_401(stack, web):
    # Given a refresh token (valid, long-lived)
    viewer = make_user(stack, "viewer")
    _access, refresh = tokens_for(web, viewer.user, viewer.password)
    # When it is used to call the API / Then 401: it only buys access tokens
    assert_unauthorized(web.get(TASKS, headers=bearer(refresh)))
    assert_unauthorized(web.post(LOGOUT, headers=bearer(refresh)))


def test_after_logout_the_access_token_and_the_refresh_token_are_refused(stack, web):
    # Given a logged-in operator whose tokens work
    operator = make_user(stack, "operator")
    access, refresh = tokens_for(web, operator.user, operator.password)
    assert web.get(TASKS, headers=bearer(access)).status_code == 200
    # When they log out with the access token
    response = web.post(LOGOUT, headers=bearer(access))
    assert response.status_code == 200, response.json
    assert response.json == {"revoked": True}
    # Then the access token is refused, and so is the refresh token issued with it
    assert_unauthorized(web.get(TASKS, headers=bearer(access)))
    assert_unauthorized(web.post(REFRESH, headers=bearer(refresh)))
    assert_unauthorized(web.post(LOGOUT, headers=bearer(access)))
    # And a fresh login still works (logout ends a session, not the account)
    again, _ = tokens_for(web, operator.user, operator.password)
    assert web.get(TASKS, headers=bearer(again)).status_code == 200


def test_logout_ends_every_access_token_of_the_session(stack, web):
    # Given a session: a login, and a second access token refreshed from its refresh token
    operator = make_user(stack, "operator")
    first, refresh = tokens_for(web, operator.user, operator.password)
    second = web.post(REFRESH, headers=bearer(refresh)).json["access_token"]
    assert web.get(TASKS, headers=bearer(second)).status_code == 200
    # When the user logs out with the first access token
    assert web.post(LOGOUT, headers=bearer(first)).status_code == 200
    # Then the refreshed access token is refused too: no token of the session outlives the logout
    assert_unauthorized(web.get(TASKS, headers=bearer(second)))
    assert_unauthorized(web.get(TASKS, headers=bearer(first)))
    assert_unauthorized(web.post(REFRESH, headers=bearer(refresh)))


def test_logout_with_an_api_key_is_a_400_and_the_key_keeps_working(stack, api_app):
    viewer = make_user(stack, "viewer")
    test_client = api_app.test_client()
    # Given an API key / When it calls logout / Then 400 (a key is revoked through /keys), and it still works
    response = test_client.post(LOGOUT, headers={"X-API-Key": viewer.key})
    assert response.status_code == 400, response.json
    assert test_client.get(TASKS, headers={"X-API-Key": viewer.key}).status_code == 200


def _tamper_signature(token: str) -> str:
    head, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    return f"{head}.{payload}.{b64url(bytes(raw))}"


def _tamper_payload(token: str) -> str:
    head, payload, signature = token.split(".")
    claims = json.loads(b64url_decode(payload))
    claims["exp"] += 3600  # a longer life, with the old signature
    return f"{head}.{b64url(json.dumps(claims).encode())}.{signature}"


def _unsigned(claims: dict[str, Any], alg: str = "none") -> str:
    header = b64url(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


BAD_TOKENS: dict[str, Callable[[dict[str, Any]], str]] = {
    "expired": lambda c: forge({**c, "iat": c["iat"] - 3600, "nbf": c["nbf"] - 3600, "exp": c["iat"] - 60}),
    "not yet valid": lambda c: forge({**c, "nbf": c["nbf"] + 3600}),
    "tampered signature": lambda c: _tamper_signature(forge(c)),
    "tampered payload": lambda c: _tamper_payload(forge(c)),
    "alg none": _unsigned,
    "alg None": lambda c: _unsigned(c, "None"),
    "alg none, real signature kept": lambda c: _unsigned(c) + forge(c).split(".")[2],
    "signed HS512": lambda c: forge(c, algorithm="HS512"),
    "wrong audience": lambda c: forge({**c, "aud": "someone-else"}),
    "no audience": lambda c: forge({k: v for k, v in c.items() if k != "aud"}),
    "wrong issuer": lambda c: forge({**c, "iss": "not-aios"}),
    "no issuer": lambda c: forge({k: v for k, v in c.items() if k != "iss"}),
    "wrong secret": lambda c: forge(c, secret="another-secret-" + "z" * 48),
    "refresh type": lambda c: forge({**c, "type": "refresh"}),
    "unknown user": lambda c: forge({**c, "sub": "987654321"}),
}


@pytest.fixture(scope="module")
def token_operator(stack: Any) -> tuple[Any, int]:
    """One operator for the bad-token cases (bcrypt makes each new user cost a quarter second)."""
    operator = make_user(stack, "operator")
    return operator, user_id(stack, operator.user)


def test_a_token_forged_with_the_real_secret_and_claims_works(stack, web, token_operator):
    # Given a token built with PyJWT exactly as the API builds them (the control for the cases below)
    _operator, uid = token_operator
    token = forge(claims_for(stack, uid))
    # When it is used / Then it works: so each refusal below is caused by the one thing changed
    response = web.get(TASKS, headers=bearer(token))
    assert response.status_code == 200, response.json


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
def test_a_bad_token_is_a_401(stack, web, token_operator, case):
    # Given an operator's valid claims, with one thing wrong (expired, tampered, alg none, HS512,
    # another audience, issuer or secret, ...)
    _operator, uid = token_operator
    token = BAD_TOKENS[case](claims_for(stack, uid))
    # When it is used on a read and on a write / Then 401 in the JSON error shape both times
    assert_unauthorized(web.get(TASKS, headers=bearer(token)))
    assert_unauthorized(web.post(TASKS, json={"type": "echo"}, headers=bearer(token)))


#: Tokens signed with the deployment's own key whose claims are odd: each must be a 401, never a 500.
ODD_CLAIMS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sub a word": lambda c: {**c, "sub": "admin"},
    "sub a list": lambda c: {**c, "sub": [c["sub"]]},
    "sub a number": lambda c: {**c, "sub": int(c["sub"])},
    "sub missing": lambda c: {k: v for k, v in c.items() if k != "sub"},
    "sub empty": lambda c: {**c, "sub": ""},
    "sub beyond a 32-bit id": lambda c: {**c, "sub": "99999999999999999999"},
    "sub negative": lambda c: {**c, "sub": "-1"},
    "sub in Arabic-Indic digits": lambda c: {**c, "sub": "".join(chr(0x660 + int(d)) for d in c["sub"])},
    "sub with a NUL": lambda c: {**c, "sub": c["sub"] + "\x00"},
    "epoch missing": lambda c: {k: v for k, v in c.items() if k != "uv"},
    "epoch a list": lambda c: {**c, "uv": [c["uv"]]},
    "epoch of another account state": lambda c: {**c, "uv": "0" * 32},
    "jti missing": lambda c: {k: v for k, v in c.items() if k != "jti"},
    "jti a list": lambda c: {**c, "jti": ["x"]},
    "rjti an object": lambda c: {**c, "rjti": {"a": 1}},
}


@pytest.mark.parametrize("case", sorted(ODD_CLAIMS))
def test_a_signed_token_with_an_odd_subject_or_claim_answers_401_json_not_500(stack, web, token_operator, case):
    # Given a token signed with the deployment's real key, whose claims are odd in one way
    _operator, uid = token_operator
    token = forge(ODD_CLAIMS[case](claims_for(stack, uid)))
    # When it is used on a read, a write and to refresh / Then 401 in the JSON error shape each time
    assert_unauthorized(web.get(TASKS, headers=bearer(token)))
    assert_unauthorized(web.post(TASKS, json={"type": "echo"}, headers=bearer(token)))
    refresh = forge(ODD_CLAIMS[case](claims_for(stack, uid, token_type="refresh")))
    assert_unauthorized(web.post(REFRESH, headers=bearer(refresh)))


# --------------------------------------------------------------------------- 3. the JWT signing key


@pytest.mark.parametrize("secret", ["s" * 31, "é" * 15 + "s"], ids=["31-ascii", "31-bytes-16-chars"])
def test_a_jwt_secret_of_31_bytes_stops_the_api_at_start(stack, celery_client, secret):
    from webapi.app import create_app

    # Given a signing key of 31 bytes (counted in UTF-8 bytes, not characters)
    assert len(secret.encode()) == 31
    settings = settings_with_security(stack, jwt_secret=secret)
    # When the app is built / Then ConfigError naming the setting and the minimum
    with pytest.raises(ConfigError) as raised:
        create_app(settings, celery_client)
    assert "security.jwt_secret" in raised.value.message
    assert "at least 32 bytes" in raised.value.message
    assert secret not in raised.value.message


def test_a_jwt_secret_of_32_bytes_is_accepted(stack, celery_client):
    from webapi.app import create_app

    app = create_app(settings_with_security(stack, jwt_secret="s" * 32), celery_client)
    assert app.test_client().get("/healthz").status_code == 200


def test_a_missing_jwt_secret_stops_the_api_at_start(stack, celery_client):
    from webapi.app import create_app

    with pytest.raises(ConfigError, match="security.jwt_secret: not set"):
        create_app(settings_with_security(stack, jwt_secret=None, jwt_secret_file=None), celery_client)


def test_the_api_command_with_a_31_byte_secret_exits_2_naming_the_setting(stack):
    # Given `aios api` with the session's database and broker, a free port, and a 31-byte key
    secret = "k" * 31
    env = {
        **stack.env,
        "AIOS_SECURITY__JWT_SECRET": secret,
        "AIOS_API__PORT": str(free_port()),
        "AIOS_API__WORKERS": "1",
    }
    # When it starts
    started = time.monotonic()
    result = run_cli(["api"], env, timeout=60)
    # Then it stops at once with status 2, and stderr names the setting (not the secret), no traceback
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "security.jwt_secret" in result.stderr
    assert "at least 32 bytes" in result.stderr
    assert secret not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=oct)
def test_a_jwt_secret_file_readable_by_group_or_others_is_refused(stack, celery_client, tmp_path, mode):
    from webapi.app import create_app

    # Given a strong key in a file that its group or others may read
    path = tmp_path / "jwt_secret"
    path.write_text("f" * 64)
    path.chmod(mode)
    settings = settings_with_security(stack, jwt_secret=None, jwt_secret_file=str(path))
    # When the app is built / Then ConfigError naming the file and the fix
    with pytest.raises(ConfigError) as raised:
        create_app(settings, celery_client)
    assert "security.jwt_secret_file" in raised.value.message
    assert "chmod 600" in raised.value.message


def test_a_jwt_secret_file_of_mode_600_is_used(stack, celery_client, tmp_path):
    from webapi.app import create_app

    # Given a strong key in a file only its owner may read
    path = tmp_path / "jwt_secret"
    path.write_text("f" * 64 + "\n")
    path.chmod(0o600)
    app = create_app(settings_with_security(stack, jwt_secret=None, jwt_secret_file=str(path)), celery_client)
    # When a user logs in there / Then the token is signed with the file's key (newline stripped)
    viewer = make_user(stack, "viewer")
    test_client = app.test_client()
    test_client.environ_base["REMOTE_ADDR"] = fresh_ip()
    access, _ = tokens_for(test_client, viewer.user, viewer.password)
    jwt.decode(access, "f" * 64, algorithms=["HS256"], audience="aios-api")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(access, TEST_JWT_SECRET, algorithms=["HS256"], audience="aios-api")


def test_the_api_command_refuses_a_group_readable_secret_file_with_exit_2(stack, tmp_path):
    path = tmp_path / "jwt_secret"
    path.write_text("g" * 64)
    path.chmod(0o644)
    env = {k: v for k, v in stack.env.items() if k != "AIOS_SECURITY__JWT_SECRET"}
    env.update({"AIOS_SECURITY__JWT_SECRET_FILE": str(path), "AIOS_API__PORT": str(free_port())})
    result = run_cli(["api"], env, timeout=60)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "security.jwt_secret_file" in result.stderr and "chmod 600" in result.stderr
    assert "g" * 64 not in result.stderr + result.stdout


# --------------------------------------------------------------------------- 4. users


def test_an_admin_creates_a_user_who_can_then_log_in(client, web):
    # Given an admin / When they create an operator
    name = unique_name("alice")
    password = f"pw-{uuid.uuid4().hex}"
    response = client.post(USERS, json={"name": name, "password": password, "role": "operator"})
    # Then 201 with the user, and nothing about the password in the answer
    assert response.status_code == 201, response.json
    assert response.json["name"] == name and response.json["role"] == "operator"
    assert response.json["disabled"] is False
    assert not any("password" in key or "hash" in key for key in response.json)
    assert password not in response.get_data(as_text=True)
    # And the user logs in and can submit
    access, _ = tokens_for(web, name, password)
    assert web.post(TASKS, json={"type": "echo", "queue": "nobody-listens"}, headers=bearer(access)).status_code == 202
    # And the same name again is a 409
    again = client.post(USERS, json={"name": name, "password": password, "role": "viewer"})
    assert again.status_code == 409, again.json


@pytest.mark.parametrize(
    "password",
    ["p" * 100, "p" * 73, "€" * 25, "p" * 7, "€€a", ""],
    ids=["100-bytes", "73-bytes", "75-bytes-25-chars", "7-bytes", "7-bytes-3-chars", "empty"],
)
def test_a_password_outside_8_to_72_bytes_is_a_422_naming_the_password(client, password):
    # Given a password too long for bcrypt or too short / When a user is created with it
    name = unique_name("bob")
    response = client.post(USERS, json={"name": name, "password": password, "role": "viewer"})
    # Then 422 naming the field password, and no user exists
    assert response.status_code == 422, response.json
    assert response.json["error"] == "validation_failed"
    assert response.json["field"] == "password"
    assert "8-72 bytes" in response.json["message"]
    assert name not in {user["name"] for user in client.get(USERS).json["users"]}


@pytest.mark.parametrize("password", ["p" * 72, "€" * 24, "p" * 8], ids=["72-ascii", "72-bytes-24-chars", "8-bytes"])
def test_a_password_of_8_to_72_bytes_is_accepted_and_logs_in(client, web, password):
    # Given a password at the edges of what bcrypt takes
    name = unique_name("carol")
    # When the user is created / Then 201, and that exact password logs in
    assert client.post(USERS, json={"name": name, "password": password, "role": "viewer"}).status_code == 201
    assert login(web, name, password).status_code == 200
    # And a password that differs only in its last character does not (no silent truncation)
    assert_unauthorized(login(web, name, password[:-1] + ("q" if password[-1] != "q" else "r")))


def test_a_password_change_to_100_bytes_is_a_422(client, stack):
    viewer = make_user(stack, "viewer")
    response = client.patch(f"{USERS}/{viewer.user}", json={"password": "p" * 100})
    assert response.status_code == 422, response.json
    assert response.json["field"] == "password"


def test_the_cli_creates_a_user_with_the_password_from_stdin(stack, web):
    # Given a name and a password on standard input
    name = unique_name("dave")
    password = f"pw-{uuid.uuid4().hex}"
    # When `aios users create NAME --role operator` runs
    result = run_cli(["users", "create", name, "--role", "operator"], stack.env, stdin=password + "\n")
    # Then it exits 0 saying so, without echoing the password
    assert result.returncode == 0, result.stderr
    assert name in result.stdout and "operator" in result.stdout
    assert password not in result.stdout + result.stderr
    # And the user logs in with that password, as an operator
    access, _ = tokens_for(web, name, password)
    assert web.get(f"{USERS}/me", headers=bearer(access)).json["role"] == "operator"


@pytest.mark.parametrize("password", ["p" * 7, "p" * 100], ids=["7-bytes", "100-bytes"])
def test_the_cli_refuses_a_password_outside_8_to_72_bytes_without_a_traceback(stack, client, password):
    # Given a password of the wrong length on standard input
    name = unique_name("erin")
    # When `aios users create` runs
    result = run_cli(["users", "create", name, "--role", "operator"], stack.env, stdin=password + "\n")
    # Then a non-zero exit with a one-line message naming the rule, no traceback, and no user
    assert result.returncode != 0
    assert "8-72 bytes" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert name not in {u["name"] for u in client.get(USERS).json["users"]}


def test_disabling_a_user_stops_their_token_and_their_keys_on_the_next_request(stack, client, web):
    # Given an operator with a working access token, a refresh token and an API key
    operator = make_user(stack, "operator")
    access, refresh = tokens_for(web, operator.user, operator.password)
    assert web.get(TASKS, headers=bearer(access)).status_code == 200
    assert web.get(TASKS, headers={"X-API-Key": operator.key}).status_code == 200
    # When an admin disables the user
    response = client.patch(f"{USERS}/{operator.user}", json={"disabled": True})
    assert response.status_code == 200, response.json
    assert response.json["disabled"] is True
    # Then on the very next request the token, the refresh token and the key (both ways of sending it) are refused
    assert_unauthorized(web.get(TASKS, headers=bearer(access)))
    assert_unauthorized(web.post(REFRESH, headers=bearer(refresh)))
    assert_unauthorized(web.get(TASKS, headers={"X-API-Key": operator.key}))
    assert_unauthorized(web.get(TASKS, headers=bearer(operator.key)))
    # And the user cannot log in, even with the right password, with the same answer as a wrong one
    body = assert_unauthorized(login(web, operator.user, operator.password))
    assert body["message"] == assert_unauthorized(login(web, operator.user, "wrong-password"))["message"]
    # And enabling them again lets them log in
    assert client.patch(f"{USERS}/{operator.user}", json={"disabled": False}).status_code == 200
    assert login(web, operator.user, operator.password).status_code == 200


def test_a_refused_key_or_token_says_nothing_of_its_owners_id_or_disabled_state(stack, client, web):
    # Given an operator with an API key and an access token, and a key that never existed
    operator = make_user(stack, "operator")
    access, _ = tokens_for(web, operator.user, operator.password)
    unknown = web.get(TASKS, headers={"X-API-Key": "aios_0123456789_" + "x" * 32})
    unknown_message = assert_unauthorized(unknown)["message"]
    # When an admin disables the operator
    assert client.patch(f"{USERS}/{operator.user}", json={"disabled": True}).status_code == 200
    # Then the key gets word for word the answer of an unknown key, and the token no user id or state
    for headers in ({"X-API-Key": operator.key}, bearer(operator.key)):
        assert assert_unauthorized(web.get(TASKS, headers=headers))["message"] == unknown_message
    message = assert_unauthorized(web.get(TASKS, headers=bearer(access)))["message"]
    uid = str(user_id(stack, operator.user))
    assert not re.search(rf"\b{uid}\b", message) and "disabled" not in message.lower(), message
    # And an agent-role owner's human key (no role in common) gets the same answer as an unknown key
    assert client.patch(f"{USERS}/{operator.user}", json={"disabled": False, "role": "agent"}).status_code == 200
    assert assert_unauthorized(web.get(TASKS, headers={"X-API-Key": operator.key}))["message"] == unknown_message


#: Each change an admin makes to an account with PATCH /users/{name}, and the change that undoes it.
ACCOUNT_CHANGES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "password change": ({"password": "a-new-password-1"}, {}),
    "disable": ({"disabled": True}, {"disabled": False}),
    "role change": ({"role": "viewer"}, {}),
}


@pytest.mark.parametrize("change", sorted(ACCOUNT_CHANGES))
def test_a_password_change_disable_or_role_change_ends_the_users_access_and_refresh_tokens(stack, client, web, change):
    # Given an operator with a working access token and refresh token
    operator = make_user(stack, "operator")
    access, refresh = tokens_for(web, operator.user, operator.password)
    assert web.get(TASKS, headers=bearer(access)).status_code == 200
    assert web.post(REFRESH, headers=bearer(refresh)).status_code == 200
    # When an admin changes the account (and, for disable, enables it again)
    body, undo = ACCOUNT_CHANGES[change]
    assert client.patch(f"{USERS}/{operator.user}", json=body).status_code == 200
    if undo:
        assert client.patch(f"{USERS}/{operator.user}", json=undo).status_code == 200
    # Then the old access token and the old refresh token answer 401, saying nothing of the account
    for refused in (web.get(TASKS, headers=bearer(access)), web.post(REFRESH, headers=bearer(refresh))):
        message = assert_unauthorized(refused)["message"]
        assert "no longer valid" in message and "log in again" in message, message
        assert str(user_id(stack, operator.user)) not in message and "disabled" not in message, message
    # And a fresh login works, with the new password if it changed, and its tokens work
    password = body.get("password", operator.password)
    new_access, new_refresh = tokens_for(web, operator.user, password)
    me = web.get(f"{USERS}/me", headers=bearer(new_access))
    assert me.status_code == 200, me.json
    assert me.json["role"] == body.get("role", "operator")
    assert web.post(REFRESH, headers=bearer(new_refresh)).status_code == 200


def test_a_password_change_ends_the_old_tokens_on_another_api_process_too(stack, client, web, start_api):
    import requests

    # Given an operator's tokens, and a second, real API process (gunicorn) that accepts them
    operator = make_user(stack, "operator")
    access, refresh = tokens_for(web, operator.user, operator.password)
    other = start_api()
    assert requests.get(f"{other.url}{TASKS}", headers=bearer(access), timeout=10).status_code == 200
    # When the password is changed through this process
    assert client.patch(f"{USERS}/{operator.user}", json={"password": "another-password-2"}).status_code == 200
    # Then the other process refuses both old tokens at once, with the JSON error shape
    for response in (
        requests.get(f"{other.url}{TASKS}", headers=bearer(access), timeout=10),
        requests.post(f"{other.url}{REFRESH}", headers=bearer(refresh), timeout=10),
    ):
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "unauthorized"
    # And a login with the new password works there
    fresh = requests.post(
        f"{other.url}{TOKEN}", json={"username": operator.user, "password": "another-password-2"}, timeout=30
    )
    assert fresh.status_code == 200, fresh.text


def test_a_demoted_users_api_key_loses_the_power_too(stack, client, web, queue):
    # Given an operator with an operator API key that can submit
    operator = make_user(stack, "operator")
    key = {"X-API-Key": operator.key}
    submit = {"type": "echo", "queue": queue}
    assert web.post(TASKS, json=submit, headers=key).status_code == 202
    # When an admin makes the user a viewer
    assert client.patch(f"{USERS}/{operator.user}", json={"role": "viewer"}).status_code == 200
    # Then the key can no longer submit either (a key never has more power than its owner), but still reads
    denied = web.post(TASKS, json=submit, headers=key)
    assert denied.status_code == 403, denied.json
    assert web.get(TASKS, headers=key).status_code == 200


# --------------------------------------------------------------------------- 5. brute force


def test_twenty_wrong_passwords_lock_the_username_even_against_the_right_password(stack, web):
    # Given a user of its own (bcrypt cost 12: each wrong password costs ~0.25 s, by design)
    viewer = make_user(stack, "viewer")
    limit = stack.settings.security.login_max_failures
    assert limit == 20
    # When 20 wrong passwords are tried for it
    for attempt in range(limit):
        response = login(web, viewer.user, f"wrong-{attempt}")
        assert response.status_code == 401, (attempt, response.json)
    # Then the 21st attempt, with the right password, is refused with 429 and a Retry-After
    locked = login(web, viewer.user, viewer.password)
    assert locked.status_code == 429, locked.json
    assert locked.json["error"] == "too_many_requests"
    retry_after = int(locked.headers["Retry-After"])
    lockout = stack.settings.security.login_lockout_s
    # And the lock lasts security.login_lockout_s from the moment it was set
    assert lockout - 5 <= retry_after <= lockout, retry_after
    assert "access_token" not in locked.json
    # And the lock is per username: another user logs in from the same address
    other = make_user(stack, "viewer")
    assert login(web, other.user, other.password).status_code == 200
    # And the user's API key is not locked (the lock is on password logins)
    assert web.get(TASKS, headers={"X-API-Key": viewer.key}).status_code == 200


def test_a_lockout_lasts_login_lockout_s_from_the_locking_failure_then_the_right_password_works(stack, app_with):
    # Given the API with login_lockout_s=8 (and 3 failures to lock, so the test is quick); every wait
    # below leaves 2 s either side, more than a bcrypt check takes on a loaded machine
    test_client = app_with(login_lockout_s=8, login_max_failures=3)
    viewer = make_user(stack, "viewer")
    # And 3 wrong passwords, the first 4 s before the other two
    assert login(test_client, viewer.user, "wrong-0").status_code == 401
    time.sleep(4)
    for attempt in (1, 2):
        assert login(test_client, viewer.user, f"wrong-{attempt}").status_code == 401
    locked_at = time.monotonic()
    # When the right password is tried at once
    locked = login(test_client, viewer.user, viewer.password)
    # Then 429, with the whole lockout still ahead in Retry-After
    assert locked.status_code == 429, locked.json
    assert int(locked.headers["Retry-After"]) >= 6, locked.headers
    # And it still holds 6 s later, although the first failure is then more than 8 s old
    time.sleep(max(0.0, locked_at + 6.0 - time.monotonic()))
    still = login(test_client, viewer.user, viewer.password)
    assert still.status_code == 429, still.json
    # And once the 8 s are over the right password works again
    time.sleep(max(0.0, locked_at + 10.0 - time.monotonic()))
    response = login(test_client, viewer.user, viewer.password)
    assert response.status_code == 200, response.json
    # And a success wipes the failures: one more wrong password does not lock again
    assert login(test_client, viewer.user, "wrong-again").status_code == 401
    assert login(test_client, viewer.user, viewer.password).status_code == 200


def test_the_per_ip_login_limit_answers_429_with_retry_after(stack, app_with):
    # Given the API with at most 3 login attempts per client address per minute
    test_client = app_with(rate_limit_login_per_minute=3)
    viewer = make_user(stack, "viewer")
    # When one address makes 3 attempts (names that do not exist, so no username lock is involved)
    for _ in range(3):
        assert_unauthorized(login(test_client, unique_name("nobody"), "wrong-password"))
    # Then the 4th, even with a right password, is 429 with Retry-After within the minute
    limited = login(test_client, viewer.user, viewer.password)
    assert limited.status_code == 429, limited.json
    assert limited.json["error"] == "too_many_requests"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    # And another address is not limited
    test_client.environ_base["REMOTE_ADDR"] = fresh_ip()
    assert login(test_client, viewer.user, viewer.password).status_code == 200


# --------------------------------------------------------------------------- 7. headers


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}


@pytest.mark.parametrize(
    ("who", "method", "path", "status"),
    [
        ("anonymous", "GET", TASKS, 401),
        ("anonymous", "GET", "/api/v1/nope", 401),
        ("anonymous", "GET", "/nope", 404),
        ("anonymous", "GET", "/healthz", 200),
        ("anonymous", "POST", TOKEN, 422),
        ("admin", "GET", TASKS, 200),
        ("admin", "GET", "/api/v1/nope", 404),
        ("admin", "PUT", TASKS, 405),
        ("admin", "POST", TASKS, 422),
    ],
)
def test_security_headers_are_on_every_answer(client, anonymous, who, method, path, status):
    # Given a request that succeeds or fails in any way (401, 404, 405, 422)
    test_client = client if who == "admin" else anonymous
    response = test_client.open(path, method=method, json={})
    assert response.status_code == status, response.get_data(as_text=True)
    # Then the answer carries the security headers
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, (name, dict(response.headers))
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_no_cors_headers_are_sent_by_default(client, method):
    # Given the default settings (security.cors_origins empty) and a browser request from another origin
    response = client.open(
        TASKS, method=method, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    )
    # Then no Access-Control-* header grants it anything
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control-")], dict(
        response.headers
    )


def test_a_too_many_requests_answer_carries_the_security_headers(stack, app_with):
    test_client = app_with(rate_limit_login_per_minute=1)
    login(test_client, unique_name("nobody"), "wrong-password")
    response = login(test_client, unique_name("nobody"), "wrong-password")
    assert response.status_code == 429
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, name


def test_the_last_active_admin_cannot_be_demoted_or_disabled(stack, api_app, client):
    # Given a user that is, for this check, the only active admin: every other admin is disabled
    from sqlalchemy import select, update

    from aios.db import session_scope
    from aios.models import User

    target = make_user(stack, "admin")
    with session_scope(stack.settings.database) as session:
        others = list(
            session.scalars(
                select(User.name).where(User.role == "admin", User.disabled.is_(False), User.name != target.user)
            )
        )
        session.execute(update(User).where(User.name.in_(others)).values(disabled=True))
    try:
        own = authorize(api_app.test_client(), target.key)
        # When it demotes or disables itself
        for body, field in (({"role": "operator"}, "role"), ({"disabled": True}, "disabled")):
            response = own.patch(f"/api/v1/users/{target.user}", json=body)
            # Then it is refused and nothing changed
            assert response.status_code == 409, response.json
            assert response.json["field"] == field
        with session_scope(stack.settings.database) as session:
            row = session.scalars(select(User).where(User.name == target.user)).one()
            assert (row.role, row.disabled) == ("admin", False)
    finally:
        with session_scope(stack.settings.database) as session:
            session.execute(update(User).where(User.name.in_(others)).values(disabled=False))
