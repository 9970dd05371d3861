"""No secret reaches a log: JWT signing key, passwords, API keys, tokens, database and broker passwords.

A real ``aios api`` (gunicorn) and a real ``aios worker`` run with passwords in their database and
broker URLs and at DEBUG level; traffic that uses and misuses every kind of credential goes through
them; then their logs, and every ``*.log`` file of this test session, are searched for each secret.
"""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy.engine import make_url

from aios.ops.log import redact
from tests.conftest import REPO_ROOT, TEST_JWT_SECRET, wait_for

pytestmark = pytest.mark.integration

PG_PASSWORD = f"pgpw{uuid.uuid4().hex[:12]}"
REDIS_PASSWORD = f"rdpw{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_pg_password(url: str) -> tuple[str, str]:
    """The database URL with a password in it (PostgreSQL here trusts local clients, so any works)."""
    parsed = make_url(url)
    if parsed.password:
        return url, str(parsed.password)
    return parsed.set(password=PG_PASSWORD).render_as_string(hide_password=False), PG_PASSWORD


def with_redis_password(url: str) -> tuple[str, str]:
    """The broker URL with a password (Redis's default user here has ``nopass``: any password works)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        return url, parts.password
    netloc = f"default:{REDIS_PASSWORD}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), REDIS_PASSWORD


def secret_env(stack: Any) -> tuple[dict[str, str], list[str]]:
    """Environment for the API and the worker: password-bearing URLs, DEBUG logs, own Redis keys."""
    database_url, pg_password = with_pg_password(stack.env["AIOS_DATABASE__URL"])
    broker_url, redis_password = with_redis_password(stack.env["AIOS_BROKER__URL"])
    env = {
        "AIOS_DATABASE__URL": database_url,
        "AIOS_BROKER__URL": broker_url,
        # Counters of their own (the per-IP login limit of 127.0.0.1 is not shared with other tests).
        "AIOS_BROKER__KEY_PREFIX": stack.env["AIOS_BROKER__KEY_PREFIX"] + "logs-",
        "AIOS_LOGGING__LEVEL": "DEBUG",
    }
    return env, [pg_password, redis_password]


def tamper(token: str) -> str:
    head, payload, signature = token.split(".")
    return f"{head}.{payload}.{signature[:-2]}{'AA' if signature[-2:] != 'AA' else 'BB'}"


def log_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*.log") if path.is_file())


def leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [label for label, secret in secrets.items() if secret and secret in text]


class Api:
    """A real ``aios api`` process (gunicorn) and the requests that go to it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aios.cli", "api"],
            env={**env, "AIOS_API__PORT": str(self.port), "AIOS_API__WORKERS": "1"},
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            assert self.process.poll() is None, self.log()
            try:
                return requests.get(f"{self.base}/healthz", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for(up, timeout=60, interval=0.3, what="aios api to answer")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return requests.request(method, self.base + path, timeout=30, **kwargs)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# --------------------------------------------------------------------------- the full run


def test_a_full_test_runs_logs_contain_none_of_the_test_secrets(
    stack, admin, start_worker, queue, tmp_path, tmp_path_factory
):
    # Given a real worker and a real `aios api`, both with passwords in their database and broker URLs,
    # logging at DEBUG
    env_overrides, url_passwords = secret_env(stack)
    worker = start_worker([queue], env=env_overrides)
    api = Api({**stack.env, **env_overrides}, tmp_path / "api.log")
    secrets: dict[str, str] = {
        "the JWT signing key": TEST_JWT_SECRET,
        "the PostgreSQL password": url_passwords[0],
        "the Redis password": url_passwords[1],
        "the admin's password": admin.password,
        "the admin's API key": admin.key,
    }
    try:
        as_admin = {"X-API-Key": admin.key}
        name = f"logtest-{uuid.uuid4().hex[:8]}"
        password = f"pw-first-{uuid.uuid4().hex}"
        new_password = f"pw-second-{uuid.uuid4().hex}"
        secrets.update({"the user's password": password, "the user's new password": new_password})

        # When an admin creates a user through the API
        created = api.call(
            "POST", "/api/v1/users", headers=as_admin, json={"name": name, "password": password, "role": "operator"}
        )
        assert created.status_code == 201, created.text

        # And the user logs in (JSON and form), and uses the access token
        login = api.call("POST", "/api/v1/auth/token", json={"username": name, "password": password})
        assert login.status_code == 200, login.text
        access, refresh = login.json()["access_token"], login.json()["refresh_token"]
        form = api.call("POST", "/api/v1/auth/token", data={"username": name, "password": password})
        assert form.status_code == 200, form.text
        token = {"Authorization": f"Bearer {access}"}
        assert api.call("GET", "/api/v1/tasks", headers=token).status_code == 200
        assert api.call("GET", "/api/v1/users/me", headers=token).json()["name"] == name
        secrets.update(
            {
                "an access token": access,
                "a refresh token": refresh,
                "a form-login access token": form.json()["access_token"],
                "a form-login refresh token": form.json()["refresh_token"],
            }
        )

        # And creates an API key, and uses it both ways (X-API-Key and Bearer aios_…)
        made = api.call("POST", "/api/v1/keys", headers=token, json={"name": "log-test", "role": "operator"})
        assert made.status_code == 201, made.text
        key = made.json()["key"]
        secrets.update({"an API key": key, "an API key's secret part": key.split("_", 2)[2]})
        by_header, by_bearer = {"X-API-Key": key}, {"Authorization": f"Bearer {key}"}

        # And submits tasks that the worker runs (one succeeds, one fails with a traceback)
        submitted = [
            api.call(
                "POST",
                "/api/v1/tasks",
                headers=by_header,
                json={"type": "echo", "parameters": {"n": 1}, "queue": queue},
            ),
            api.call(
                "POST",
                "/api/v1/tasks",
                headers=by_bearer,
                json={"type": "echo", "parameters": {"n": 2}, "queue": queue},
            ),
            api.call(
                "POST",
                "/api/v1/tasks",
                headers=token,
                json={"type": "test.always_fail", "max_retries": 0, "queue": queue},
            ),
        ]
        assert [r.status_code for r in submitted] == [202, 202, 202], [r.text for r in submitted]
        ids = [r.json()["id"] for r in submitted]

        def finished() -> list[str] | None:
            states = [api.call("GET", f"/api/v1/tasks/{i}", headers=by_header).json()["state"] for i in ids]
            return states if all(s in ("SUCCEEDED", "FAILED", "DEAD") for s in states) else None

        states = wait_for(finished, timeout=60, interval=0.3, what="the tasks to finish")
        assert states[:2] == ["SUCCEEDED", "SUCCEEDED"], states
        assert states[2] in ("FAILED", "DEAD"), states

        # And refreshes, and rotates the key and uses the new one
        renewed = api.call("POST", "/api/v1/auth/refresh", headers={"Authorization": f"Bearer {refresh}"})
        assert renewed.status_code == 200, renewed.text
        secrets["a refreshed access token"] = renewed.json()["access_token"]
        assert (
            api.call(
                "GET", "/api/v1/tasks", headers={"Authorization": f"Bearer {renewed.json()['access_token']}"}
            ).status_code
            == 200
        )
        rotated = api.call("POST", f"/api/v1/keys/{made.json()['id']}/rotate", headers=by_header, json={})
        assert rotated.status_code == 201, rotated.text
        secrets["a rotated API key"] = rotated.json()["key"]
        assert api.call("GET", "/api/v1/tasks", headers={"X-API-Key": rotated.json()["key"]}).status_code == 200

        # And an admin changes the user's password (which ends the old tokens), and the user logs in again
        changed = api.call("PATCH", f"/api/v1/users/{name}", headers=as_admin, json={"password": new_password})
        assert changed.status_code == 200, changed.text
        assert api.call("GET", "/api/v1/tasks", headers=token).status_code == 401
        relogin = api.call("POST", "/api/v1/auth/token", json={"username": name, "password": new_password})
        assert relogin.status_code == 200, relogin.text
        access, refresh = relogin.json()["access_token"], relogin.json()["refresh_token"]
        secrets.update(
            {"an access token after the password change": access, "a refresh token after the password change": refresh}
        )
        token = {"Authorization": f"Bearer {access}"}

        # And credentials are misused: a wrong password, an unknown user, a bad key, a bad token,
        # a refresh token as an access token, Basic auth, and a key and a token in the query string
        wrong_password = f"wrong-{uuid.uuid4().hex}"
        ghost_password = f"ghost-{uuid.uuid4().hex}"
        bad_key = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        bad_token = tamper(access)
        secrets.update(
            {
                "a wrong password": wrong_password,
                "an unknown user's password": ghost_password,
                "a bad API key": bad_key,
                "a tampered token": bad_token,
            }
        )
        basic = base64.b64encode(f"{name}:{new_password}".encode()).decode()
        refused = [
            api.call("POST", "/api/v1/auth/token", json={"username": name, "password": wrong_password}),
            api.call("POST", "/api/v1/auth/token", data={"username": "nobody-" + name, "password": ghost_password}),
            api.call("GET", "/api/v1/tasks", headers={"X-API-Key": bad_key}),
            api.call("GET", "/api/v1/tasks", headers={"Authorization": f"Bearer {bad_key}"}),
            api.call("GET", "/api/v1/tasks", headers={"Authorization": f"Bearer {bad_token}"}),
            api.call("GET", "/api/v1/tasks", headers={"Authorization": f"Bearer {refresh}"}),
            api.call("GET", "/api/v1/tasks", headers={"Authorization": f"Basic {basic}"}),
            api.call("GET", f"/api/v1/tasks?api_key={urllib.parse.quote(key)}"),
            api.call("GET", f"/api/v1/tasks?access_token={access}"),
            api.call("POST", "/api/v1/tasks", headers=by_header, data=f"password={new_password}"),
        ]
        assert [r.status_code for r in refused] == [401] * 9 + [415], [(r.status_code, r.text) for r in refused]

        # And the user logs out: both tokens are refused afterwards
        assert api.call("POST", "/api/v1/auth/logout", headers=token).status_code == 200
        assert api.call("GET", "/api/v1/tasks", headers=token).status_code == 401
        assert (
            api.call("POST", "/api/v1/auth/refresh", headers={"Authorization": f"Bearer {refresh}"}).status_code == 401
        )
    finally:
        api.stop()
        worker.stop()

    # Then the logs show the traffic happened (the search below is not over empty files)
    api_log, worker_log = api.log(), worker.log()
    assert "POST /api/v1/auth/token" in api_log, api_log[-3000:]
    assert "GET /api/v1/tasks" in api_log
    assert ids[0] in worker_log and "always fails" in worker_log, worker_log[-3000:]
    # And neither the API's log nor the worker's holds any of the secrets
    assert leaks(api_log, secrets) == [], api_log
    assert leaks(worker_log, secrets) == [], worker_log
    # And no *.log file of this whole test session does either (other tests' workers and APIs included)
    files = log_files(tmp_path_factory.getbasetemp())
    assert api.log_path in files and worker.log_path in files
    found = {str(path): leaks(path.read_text(errors="replace"), secrets) for path in files}
    assert {path: labels for path, labels in found.items() if labels} == {}


# --------------------------------------------------------------------------- aios config


def test_aios_config_prints_no_database_broker_or_jwt_password(stack):
    # Given passwords in the database and broker URLs and the JWT signing key in the environment
    env = {
        **stack.env,
        "AIOS_BROKER__URL": "redis://user:s3cretpw@127.0.0.1:6379/0",
        "AIOS_DATABASE__URL": "postgresql+psycopg2://aios:dbs3cretpw@127.0.0.1:5432/aios",
    }
    # When `aios config` prints the effective configuration
    result = subprocess.run(
        [sys.executable, "-m", "aios.cli", "config"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    # Then it succeeds and shows where things are, but none of the secrets
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "s3cretpw" not in output
    assert "dbs3cretpw" not in output
    assert TEST_JWT_SECRET not in output
    assert "127.0.0.1:6379" in output and "user:***@" in output
    assert "aios:***@" in output


# --------------------------------------------------------------------------- the redactor itself


KEY = "aios_0123456789_" + "Zx9-_" * 6 + "ab"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxIiwidHlwZSI6ImFjY2VzcyJ9."
    "mG3v4bF0yq7m3X1e2c9Yk0pQb6lS5dTq8wN2rJ4hV7s"
)


@pytest.mark.parametrize(
    ("line", "secret", "kept"),
    [
        (f"auth with X-API-Key: {KEY} failed", KEY[16:], "X-API-Key: ***"),
        (f"unknown key {KEY} refused", KEY[16:], "key aios_0123456789_*** refused"),
        (f"Authorization: Bearer {KEY}", KEY[16:], "Authorization: Bearer ***"),
        (f"token {JWT} rejected", JWT.split(".")[2], "eyJ***"),
        (f"Authorization: Bearer {JWT}", JWT.split(".")[1], "Bearer"),
        ("Authorization: bearer opaque-token-value-123", "opaque-token-value-123", "bearer ***"),
        ("connecting to redis://user:s3cretpw@127.0.0.1:6379/0", "s3cretpw", "redis://user:***@127.0.0.1:6379/0"),
        ("db postgresql+psycopg2://aios:pgs3cret@db:5432/aios", "pgs3cret", "postgresql+psycopg2://aios:***@db"),
        ("rediss://:onlypass123@cache:6380/1", "onlypass123", "rediss://:***@cache"),
        ("login password=hunter2hunter2 for bob", "hunter2hunter2", "for bob"),
        ('body {"username": "bob", "password": "hunter2hunter2"}', "hunter2hunter2", '"username": "bob"'),
        ("AIOS_SECURITY__JWT_SECRET=abcdefghijklmnopqrstuvwxyz0123456789", "abcdefghijklmnopqrstuvwxyz", "AIOS_"),
        ("api_key: 'k3y-v4lu3-xyz'", "k3y-v4lu3-xyz", "api_key"),
        (f"two keys {KEY} and {KEY.replace('Z', 'Q')}", "Qx9-_", "two keys"),
    ],
)
def test_the_redactor_masks_secrets_in_log_lines(line, secret, kept):
    # Given a log line holding a secret / When it is redacted
    out = redact(line)
    # Then the secret is gone and the context around it is kept
    assert secret not in out, out
    assert kept in out, out


@pytest.mark.parametrize(
    "line",
    [
        "task 3f1c2d9e-0000-4000-8000-000000000000 SUCCEEDED in 0.12s",
        "GET /api/v1/tasks?limit=50 200",
        "agent w1@host ready on queues ['default']",
        "redis://127.0.0.1:6379/0",
    ],
)
def test_the_redactor_leaves_ordinary_lines_alone(line):
    assert redact(line) == line


def test_the_running_log_handler_redacts(tmp_path):
    # Given the formatter every AIOS process logs through
    import logging

    from aios.ops.log import RedactingFormatter

    path = tmp_path / "handler.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(f"aios.test.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        # When code logs a key, a token and a URL password through %-formatting and in an exception
        logger.warning("key %s token %s", KEY, JWT)
        try:
            raise RuntimeError(f"cannot reach redis://u:s3cretpw@h:6379/0 with {KEY}")
        except RuntimeError:
            logger.exception("broker down")
    finally:
        handler.close()
        logger.removeHandler(handler)
    # Then the file holds none of them (the traceback included)
    text = path.read_text()
    assert "broker down" in text and "RuntimeError" in text
    for secret in (KEY[16:], JWT.split(".")[2], "s3cretpw"):
        assert secret not in text, text
