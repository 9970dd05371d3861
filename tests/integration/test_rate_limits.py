"""Rate limits: per principal and per route class (read, write), one counter for every API process.

With Redis as the broker the counters live in Redis, so two real ``aios api`` processes share them; on
the embedded default (SQLite, filesystem broker, no Redis) they live in the database's ``counters``
table, so two apps on the same SQLite file share them too.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from aios.security.store import DatabaseStore, RedisStore
from tests.conftest import REDIS_URL, REPO_ROOT, authorize, make_user

pytestmark = pytest.mark.integration

WRITES_PER_MINUTE = 5
READS_PER_MINUTE = 8


def submit(api: Any, key: str, queue: str, n: int) -> requests.Response:
    """POST /api/v1/tasks to a real API process (an echo task on a queue nobody consumes)."""
    return requests.post(
        f"{api.url}/api/v1/tasks",
        json={"type": "echo", "parameters": {"n": n}, "queue": queue},
        headers={"X-API-Key": key, "Connection": "close"},
        timeout=10,
    )


def read(api: Any, key: str) -> requests.Response:
    return requests.get(
        f"{api.url}/api/v1/tasks", params={"limit": 1}, headers={"X-API-Key": key, "Connection": "close"}, timeout=10
    )


def assert_too_many(response: Any, json_body: dict[str, Any], limit: int, route_class: str) -> int:
    """A 429 with a JSON error and an integer Retry-After of 1..60 s (the window is a minute)."""
    assert response.status_code == 429, json_body
    assert json_body["error"] == "too_many_requests"
    assert f"{limit} {route_class} requests per minute" in json_body["message"]
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after
    assert 1 <= int(retry_after) <= 60
    assert json_body["retry_after_s"] == int(retry_after)
    return int(retry_after)


@pytest.mark.slow
def test_the_write_limit_is_shared_by_two_api_processes_through_redis_and_the_next_write_gets_429_with_retry_after(
    stack, start_api, queue
):
    # Given two real API processes, each allowing 5 writes and 8 reads per principal per minute
    limits = {
        "AIOS_SECURITY__RATE_LIMIT_WRITE_PER_MINUTE": str(WRITES_PER_MINUTE),
        "AIOS_SECURITY__RATE_LIMIT_READ_PER_MINUTE": str(READS_PER_MINUTE),
    }
    a, b = start_api(name="api-a", env=limits), start_api(name="api-b", env=limits)
    pat, quinn = make_user(stack, "operator"), make_user(stack, "operator")

    # When one principal sends 5 writes, alternately to A and B
    for n in range(WRITES_PER_MINUTE):
        response = submit((a, b)[n % 2], pat.key, queue, n)
        # Then each is accepted (neither process alone reaches the limit of 5)
        assert response.status_code == 202, (n, response.text)

    # When it sends a 6th write (to B, which has seen only 2 of them)
    sixth = submit(b, pat.key, queue, WRITES_PER_MINUTE)

    # Then that is 429 with a JSON error body and a Retry-After header: the count is shared
    assert sixth.headers["Content-Type"].startswith("application/json")
    assert_too_many(sixth, sixth.json(), WRITES_PER_MINUTE, "write")
    # and A refuses the next one too
    assert_too_many(seventh := submit(a, pat.key, queue, 6), seventh.json(), WRITES_PER_MINUTE, "write")
    # and the counter is the one in Redis, under the session's key prefix
    import redis

    counter = f"{stack.settings.broker.key_prefix}aios:sec:rl:write:user:{pat.user}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert int(client.get(counter)) == WRITES_PER_MINUTE + 2
        assert 0 < client.ttl(counter) <= 60
    finally:
        client.close()

    # And another principal is not limited, on either process
    assert submit(a, quinn.key, queue, 100).status_code == 202
    assert submit(b, quinn.key, queue, 101).status_code == 202

    # And reads have their own class: the limited principal still reads, 8 times, alternately on A and B
    for n in range(READS_PER_MINUTE):
        response = read((a, b)[n % 2], pat.key)
        assert response.status_code == 200, (n, response.text)
    # then the 9th read is refused the same way
    ninth = read(a, pat.key)
    assert_too_many(ninth, ninth.json(), READS_PER_MINUTE, "read")
    assert read(b, quinn.key).status_code == 200


def test_on_the_embedded_default_two_apps_share_the_rate_limit_through_the_database(tmp_path: Path):
    from aios import migrate
    from aios.config import load_settings
    from aios.db import dispose_engines, session_scope
    from aios.models import Counter
    from aios.security import api_keys
    from aios.security.users import create_user
    from webapi.app import create_app

    # Given the embedded default: a migrated SQLite file, the filesystem broker, no Redis, small limits
    url = f"sqlite:///{tmp_path / 'a.db'}"
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml"),
            "AIOS_DATABASE__URL": url,
            "AIOS_BROKER__URL": "filesystem://localhost/",
            "AIOS_BROKER__DATA_DIR": str(tmp_path / "broker"),
            "AIOS_SECURITY__JWT_SECRET": uuid.uuid4().hex + uuid.uuid4().hex[:8],
            "AIOS_SECURITY__RATE_LIMIT_WRITE_PER_MINUTE": "3",
            "AIOS_SECURITY__RATE_LIMIT_READ_PER_MINUTE": "4",
        }
    )
    assert settings.database.is_sqlite and not settings.broker.is_redis
    migrate.upgrade(settings.database)

    def principal(name: str) -> str:
        with session_scope(settings.database) as session:
            user = create_user(
                session, name, f"pw-{uuid.uuid4().hex}", "operator", bcrypt_cost=settings.security.bcrypt_cost
            )
            return api_keys.generate(
                session, name=f"{name}-key", role="operator", owner_id=user.id, expires_at=None
            ).plaintext

    try:
        pat, quinn = principal("pat"), principal("quinn")
        # and two apps (as two API processes would build them) on the same SQLite file
        first, second = create_app(settings), create_app(settings)
        for app in (first, second):
            assert isinstance(app.extensions["aios_security_store"], DatabaseStore)
            assert not isinstance(app.extensions["aios_security_store"], RedisStore)
        clients = (authorize(first.test_client(), pat), authorize(second.test_client(), pat))

        # When one principal sends 3 writes alternately to the two apps
        for n in range(3):
            response = clients[n % 2].post("/api/v1/tasks", json={"type": "echo", "parameters": {"n": n}})
            # Then each is accepted
            assert response.status_code == 202, (n, response.json)

        # When it sends a 4th write (to the app that has seen only 1 of them)
        fourth = clients[1].post("/api/v1/tasks", json={"type": "echo", "parameters": {"n": 3}})

        # Then it is 429 with Retry-After: the counter is shared through the database
        assert fourth.is_json
        assert_too_many(fourth, fourth.json, 3, "write")
        with session_scope(settings.database) as session:
            row = session.get(Counter, "rl:write:user:pat")
            assert row is not None and row.value == 4

        # And another principal is not limited
        other = authorize(second.test_client(), quinn)
        assert other.post("/api/v1/tasks", json={"type": "echo", "parameters": {}}).status_code == 202

        # And reads have their own class: 4 reads pass, alternately, and the 5th is refused
        for n in range(4):
            assert clients[n % 2].get("/api/v1/tasks").status_code == 200, n
        fifth = clients[0].get("/api/v1/tasks")
        assert_too_many(fifth, fifth.json, 4, "read")
    finally:
        dispose_engines()  # close this test's SQLite connections (other engines are made again on use)


def test_a_user_with_three_keys_gets_429_after_the_write_limit_summed_over_all_their_keys(stack, celery_client, queue):
    from webapi.app import create_app

    # Given an API allowing 6 writes per minute, and an operator who makes two more keys (2 writes)
    app = create_app(stack.override(security={"rate_limit_write_per_minute": 6}).settings, celery_client)
    pat, quinn = make_user(stack, "operator"), make_user(stack, "operator")
    keys = [pat.key]
    for n in range(2):
        made = authorize(app.test_client(), pat.key).post(
            "/api/v1/keys", json={"name": f"extra-{n}", "role": "operator"}
        )
        assert made.status_code == 201, made.json
        keys.append(made.json["key"])
    clients = [authorize(app.test_client(), key) for key in keys]

    # When the user submits round the three keys
    answers = [
        clients[n % 3].post("/api/v1/tasks", json={"type": "echo", "parameters": {"n": n}, "queue": queue})
        for n in range(5)
    ]

    # Then the 4 writes left of the 6 pass, and the 5th is a 429 although each key sent at most 2
    assert [a.status_code for a in answers] == [202] * 4 + [429], [a.json for a in answers]
    assert_too_many(answers[-1], answers[-1].json, 6, "write")
    # And every key of the user is refused now, and so is the user's token
    for client in clients:
        assert client.post("/api/v1/tasks", json={"type": "echo", "queue": queue}).status_code == 429
    login = app.test_client().post("/api/v1/auth/token", json={"username": pat.user, "password": pat.password})
    token = {"Authorization": f"Bearer {login.json['access_token']}"}
    assert (
        app.test_client().post("/api/v1/tasks", json={"type": "echo", "queue": queue}, headers=token).status_code == 429
    )
    # And another user is not limited
    other = authorize(app.test_client(), quinn.key)
    assert other.post("/api/v1/tasks", json={"type": "echo", "queue": queue}).status_code == 202
