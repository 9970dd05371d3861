"""API keys: shown once and stored only as a hash; revoke, activate, rotate and delete take effect at once,
also on another API process; who may create, see and manage which keys.

Real PostgreSQL (the session's schema) and Redis; the revoke and expiry tests run two real ``aios api``
(gunicorn) processes and check one process sees what the other did, with no cache in between.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from aios.db import session_scope
from aios.models import ApiKey
from aios.timeutil import as_utc, utcnow
from tests.conftest import Stack, authorize, make_user, wait_for

pytestmark = pytest.mark.integration

#: ``aios_<prefix>_<secret>``: a hex prefix that finds the row, then a URL-safe base64 secret.
KEY_FORMAT = re.compile(r"^aios_(?P<prefix>[0-9a-f]{8,16})_(?P<secret>[A-Za-z0-9_-]+)$")


# --------------------------------------------------------------------------- helpers


def key_parts(key: str) -> tuple[str, str]:
    match = KEY_FORMAT.match(key)
    assert match, f"not formatted aios_<prefix>_<secret>: {key!r}"
    return match["prefix"], match["secret"]


def as_client(api_app: Any, key: str) -> Any:
    return authorize(api_app.test_client(), key)


def create_key(test_client: Any, role: str, **extra: Any) -> dict[str, Any]:
    response = test_client.post("/api/v1/keys", json={"name": f"k-{uuid.uuid4().hex[:6]}", "role": role, **extra})
    assert response.status_code == 201, response.json
    return response.json  # type: ignore[no-any-return]


def key_row(stack: Stack, key_id: str) -> ApiKey | None:
    with session_scope(stack.settings.database) as session:
        return session.get(ApiKey, key_id)


def set_key_expiry(stack: Stack, key_id: str, expires_at: datetime) -> None:
    with session_scope(stack.settings.database) as session:
        session.get(ApiKey, key_id).expires_at = expires_at


def dump_schema(url: str) -> str:
    """Every value of every row of every table in the session's schema, as text."""
    engine = sa.create_engine(url)
    try:
        metadata = sa.MetaData()
        metadata.reflect(bind=engine)
        assert "api_keys" in metadata.tables and "audit_log" in metadata.tables, sorted(metadata.tables)
        chunks: list[str] = []
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                for row in connection.execute(sa.select(table)):
                    chunks.extend(f"{table.name}: {value}" for value in row)
        return "\n".join(chunks)
    finally:
        engine.dispose()


def http(api: Any, method: str, path: str, key: str, **kwargs: Any) -> requests.Response:
    """One request to a real API process, on a fresh connection (no keep-alive held at shutdown)."""
    return requests.request(
        method, f"{api.url}{path}", headers={"X-API-Key": key, "Connection": "close"}, timeout=10, **kwargs
    )


# --------------------------------------------------------------------------- created keys


def test_a_created_key_authenticates_as_x_api_key_and_as_bearer_and_only_a_hash_of_its_secret_is_stored(
    stack, api_app, anonymous
):
    # Given an operator
    operator = make_user(stack, "operator")
    before = utcnow()

    # When it creates an operator key that expires in 30 days
    created = as_client(api_app, operator.key).post(
        "/api/v1/keys", json={"name": "ci-deploy", "role": "operator", "expires_in_days": 30}
    )

    # Then the answer is 201 with the key, formatted aios_<prefix>_<secret>, the secret at least 128 bits
    assert created.status_code == 201, created.json
    body = created.json
    key = body["key"]
    prefix, secret = key_parts(key)
    assert body["prefix"] == prefix
    assert len(secret) * 6 >= 128, f"secret of {len(secret)} base64url characters is under 128 bits"
    assert len(secret) >= 32  # 192 bits as documented
    assert (body["name"], body["role"], body["owner"], body["state"]) == (
        "ci-deploy",
        "operator",
        operator.user,
        "ACTIVE",
    )
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert abs(expires_at - (before + timedelta(days=30))) < timedelta(minutes=1)
    assert "secret_hash" not in body

    # And it authenticates as X-API-Key ...
    assert as_client(api_app, key).get("/api/v1/keys").status_code == 200
    # ... and as Authorization: Bearer aios_…
    bearer = anonymous.get("/api/v1/keys", headers={"Authorization": f"Bearer {key}"})
    assert bearer.status_code == 200, bearer.json
    # while the same prefix with another secret does not
    forged = f"aios_{prefix}_{'A' * len(secret)}"
    assert anonymous.get("/api/v1/keys", headers={"X-API-Key": forged}).status_code == 401
    assert anonymous.get("/api/v1/keys", headers={"Authorization": f"Bearer {forged}"}).status_code == 401

    # And no table of the schema holds the key or its secret in plaintext
    dump = dump_schema(stack.settings.database.url)
    assert key not in dump
    assert secret not in dump
    # only the SHA-256 of the secret is stored
    row = key_row(stack, body["id"])
    assert row is not None
    assert row.prefix == prefix
    assert row.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert row.secret_hash in dump

    # And its last use (time and address) was recorded
    assert row.last_used_at is not None
    assert before <= as_utc(row.last_used_at) <= utcnow()
    assert row.last_used_ip == "127.0.0.1"
    listed = {k["id"]: k for k in as_client(api_app, operator.key).get("/api/v1/keys").json["keys"]}
    assert listed[body["id"]]["last_used_at"] is not None
    assert listed[body["id"]]["last_used_ip"] == "127.0.0.1"


def test_listing_keys_never_shows_a_secret_or_hash_and_shows_an_operator_only_its_own_keys(stack, api_app, client):
    # Given two operators with a new key each, and an admin key
    alice, bob = make_user(stack, "operator"), make_user(stack, "operator")
    alice_key = create_key(as_client(api_app, alice.key), "operator")
    bob_key = create_key(as_client(api_app, bob.key), "viewer")
    admin_key = create_key(client, "admin")
    secrets_and_hashes = []
    for created in (alice_key, bob_key, admin_key):
        secret = key_parts(created["key"])[1]
        secrets_and_hashes += [created["key"], secret, hashlib.sha256(secret.encode()).hexdigest()]

    # When alice lists keys
    mine = as_client(api_app, alice.key).get("/api/v1/keys")

    # Then she sees only her own keys (the test key of make_user and the new one), never bob's or the admin's
    assert mine.status_code == 200
    owners = {k["owner"] for k in mine.json["keys"]}
    ids = {k["id"] for k in mine.json["keys"]}
    assert owners == {alice.user}
    assert alice_key["id"] in ids
    assert bob_key["id"] not in ids and admin_key["id"] not in ids
    assert len(mine.json["keys"]) == 2

    # When the admin lists keys
    everything = client.get("/api/v1/keys")

    # Then it sees every key, alice's, bob's and its own
    assert everything.status_code == 200
    all_ids = {k["id"] for k in everything.json["keys"]}
    assert {alice_key["id"], bob_key["id"], admin_key["id"]} <= all_ids
    assert {alice.user, bob.user} <= {k["owner"] for k in everything.json["keys"]}

    # And no listing carries a key, a secret or a hash
    for listing in (mine, everything):
        for item in listing.json["keys"]:
            assert "key" not in item and "secret_hash" not in item and "secret" not in item
        text = listing.get_data(as_text=True)
        for value in secrets_and_hashes:
            assert value not in text


# --------------------------------------------------------------------------- revoke, activate, expiry


@pytest.mark.slow
def test_a_revoked_key_gets_401_from_a_second_api_process_within_one_second_and_an_admin_can_activate_it(
    stack, start_api, admin
):
    # Given two real API processes, and an operator key that works on both
    a, b = start_api(name="api-a"), start_api(name="api-b")
    operator = make_user(stack, "operator")
    created = http(a, "POST", "/api/v1/keys", operator.key, json={"name": "to-revoke", "role": "operator"})
    assert created.status_code == 201, created.text
    key_id, key = created.json()["id"], created.json()["key"]
    assert http(a, "GET", "/api/v1/keys", key).status_code == 200
    assert http(b, "GET", "/api/v1/keys", key).status_code == 200

    # When its owner revokes it through process A
    revoked = http(a, "POST", f"/api/v1/keys/{key_id}/revoke", operator.key)
    answered = time.monotonic()
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["state"] == "REVOKED" and revoked.json()["revoked_at"]

    # Then the first request process B gets after the revoke's answer is refused: nothing caches a key,
    # so "within a second on every process" holds with no time to wait out, whatever the machine's load
    refused = http(b, "GET", "/api/v1/keys", key)
    assert refused.status_code == 401, f"process B accepted the revoked key {time.monotonic() - answered:.3f}s later"
    # and so does A, and a second revoke is a conflict
    assert http(a, "GET", "/api/v1/keys", key).status_code == 401
    assert http(b, "POST", f"/api/v1/keys/{key_id}/revoke", operator.key).status_code == 409

    # When its owner (an operator) tries to activate it
    denied = http(b, "POST", f"/api/v1/keys/{key_id}/activate", operator.key)

    # Then that is 403: only an admin activates keys
    assert denied.status_code == 403, denied.text

    # When an admin activates it through process B
    activated = http(b, "POST", f"/api/v1/keys/{key_id}/activate", admin.key)

    # Then it is ACTIVE and works again on both processes
    assert activated.status_code == 200, activated.text
    assert activated.json()["state"] == "ACTIVE" and activated.json()["revoked_at"] is None
    assert http(a, "GET", "/api/v1/keys", key).status_code == 200
    assert http(b, "GET", "/api/v1/keys", key).status_code == 200
    # (activating an active key is a conflict)
    assert http(a, "POST", f"/api/v1/keys/{key_id}/activate", admin.key).status_code == 409

    # When it is revoked again and has meanwhile expired
    assert http(a, "POST", f"/api/v1/keys/{key_id}/revoke", admin.key).status_code == 200
    set_key_expiry(stack, key_id, utcnow() - timedelta(minutes=1))

    # Then activating it is a 409 (create a new one instead), and it stays refused
    expired = http(b, "POST", f"/api/v1/keys/{key_id}/activate", admin.key)
    assert expired.status_code == 409, expired.text
    assert expired.json()["error"] == "conflict" and expired.json()["state"] == "EXPIRED"
    assert http(a, "GET", "/api/v1/keys", key).status_code == 401
    assert key_row(stack, key_id).state == "REVOKED"


@pytest.mark.slow
def test_an_expired_key_is_refused_at_once_by_every_api_process(stack, start_api):
    # Given two real API processes, and an operator key that works on both
    a, b = start_api(name="api-a"), start_api(name="api-b")
    operator = make_user(stack, "operator")
    created = http(
        a, "POST", "/api/v1/keys", operator.key, json={"name": "expiring", "role": "operator", "expires_in_days": 1}
    )
    assert created.status_code == 201, created.text
    key_id, key = created.json()["id"], created.json()["key"]
    assert http(a, "GET", "/api/v1/keys", key).status_code == 200
    assert http(b, "GET", "/api/v1/keys", key).status_code == 200

    # When its expiry passes (set in the database, as time would)
    set_key_expiry(stack, key_id, utcnow() - timedelta(seconds=1))

    # Then the very next request on either process is refused with 401
    for api in (b, a):
        refused = http(api, "GET", "/api/v1/keys", key)
        assert refused.status_code == 401, (api.name, refused.text)
        assert refused.json()["error"] == "unauthorized"
    # and its owner sees it as EXPIRED
    listed = {k["id"]: k for k in http(a, "GET", "/api/v1/keys", operator.key).json()["keys"]}
    assert listed[key_id]["state"] == "EXPIRED"


# --------------------------------------------------------------------------- rotate


def test_after_rotation_both_keys_work_until_the_grace_period_ends_then_only_the_new_one(stack, api_app):
    # Given an operator's key that expires in 10 days
    operator = make_user(stack, "operator")
    owner = as_client(api_app, operator.key)
    old = create_key(owner, "operator", expires_in_days=10)

    # When it is rotated with a 2 s grace period
    sent = time.time()
    rotated = owner.post(f"/api/v1/keys/{old['id']}/rotate", json={"grace_s": 2})
    answered = time.time()

    # Then a new key with the same name, role and expiry is returned, and the old one expires in 2 s
    assert rotated.status_code == 201, rotated.json
    new = rotated.json
    assert new["id"] != old["id"] and new["key"] != old["key"]
    key_parts(new["key"])
    assert (new["name"], new["role"], new["expires_at"]) == (old["name"], old["role"], old["expires_at"])
    old_expiry = datetime.fromisoformat(new["old_key_expires_at"]).timestamp()
    assert sent + 2 - 0.01 <= old_expiry <= answered + 2 + 0.01
    assert key_row(stack, old["id"]).rotated_to == new["id"]

    # And right after the rotation both keys work
    assert as_client(api_app, old["key"]).get("/api/v1/keys").status_code == 200
    assert as_client(api_app, new["key"]).get("/api/v1/keys").status_code == 200

    # When the grace period passes
    def old_key_refused() -> float | None:
        status = as_client(api_app, old["key"]).get("/api/v1/keys").status_code
        assert status in (200, 401)
        return time.time() if status == 401 else None

    refused_at = wait_for(old_key_refused, timeout=6, interval=0.05, what="the rotated-out key to be refused")

    # Then the old key was refused only after its 2 s, and promptly then
    assert refused_at >= sent + 2, f"the old key was refused {refused_at - sent:.2f}s after rotation, before 2 s"
    assert refused_at <= answered + 3, f"the old key still worked {refused_at - answered:.2f}s after rotation"
    # and the new one keeps working
    assert as_client(api_app, new["key"]).get("/api/v1/keys").status_code == 200
    listed = {k["id"]: k for k in owner.get("/api/v1/keys").json["keys"]}
    assert listed[old["id"]]["state"] == "EXPIRED" and listed[old["id"]]["rotated_to"] == new["id"]
    assert listed[new["id"]]["state"] == "ACTIVE"
    # and the expired old key cannot be rotated again
    assert owner.post(f"/api/v1/keys/{old['id']}/rotate", json={"grace_s": 2}).status_code == 409


def test_the_default_rotation_grace_comes_from_the_config_and_more_than_7_days_is_refused(
    stack, api_app, celery_client
):
    from webapi.app import create_app

    operator = make_user(stack, "operator")
    owner = as_client(api_app, operator.key)

    # When a key is rotated without grace_s on the default config
    first = create_key(owner, "operator")
    rotated = owner.post(f"/api/v1/keys/{first['id']}/rotate", json={})

    # Then the old key keeps working for security.key_rotation_grace_s (default 86400 s)
    assert stack.settings.security.key_rotation_grace_s == 86_400
    assert rotated.status_code == 201, rotated.json
    grace = datetime.fromisoformat(rotated.json["old_key_expires_at"]) - utcnow()
    assert timedelta(seconds=86_400 - 60) < grace <= timedelta(seconds=86_400)
    assert as_client(api_app, first["key"]).get("/api/v1/keys").status_code == 200

    # And a bare POST (no body at all) means the same default
    bare = create_key(owner, "operator")
    bare_rotated = owner.post(f"/api/v1/keys/{bare['id']}/rotate")
    assert bare_rotated.status_code == 201, bare_rotated.json
    grace = datetime.fromisoformat(bare_rotated.json["old_key_expires_at"]) - utcnow()
    assert timedelta(seconds=86_400 - 60) < grace <= timedelta(seconds=86_400)

    # When the API runs with key_rotation_grace_s = 600
    short = stack.override(security={"key_rotation_grace_s": 600})
    short_app = create_app(short.settings, celery_client)
    second = create_key(as_client(short_app, operator.key), "operator")
    rotated = as_client(short_app, operator.key).post(f"/api/v1/keys/{second['id']}/rotate", json={})

    # Then that is the default grace
    assert rotated.status_code == 201, rotated.json
    grace = datetime.fromisoformat(rotated.json["old_key_expires_at"]) - utcnow()
    assert timedelta(seconds=600 - 60) < grace <= timedelta(seconds=600)

    # When a grace of 8 days is asked for
    third = create_key(owner, "operator")
    too_long = owner.post(f"/api/v1/keys/{third['id']}/rotate", json={"grace_s": 8 * 86_400})

    # Then that is a 422 naming grace_s, and the key was not rotated
    assert too_long.status_code == 422, too_long.json
    assert too_long.json["field"] == "grace_s"
    row = key_row(stack, third["id"])
    assert row.rotated_to is None and row.expires_at is None
    # while exactly 7 days is allowed
    assert owner.post(f"/api/v1/keys/{third['id']}/rotate", json={"grace_s": 7 * 86_400}).status_code == 201


# --------------------------------------------------------------------------- delete, ownership, roles


def test_a_deleted_key_is_gone_and_gets_401(stack, api_app):
    # Given an operator's extra key that works
    operator = make_user(stack, "operator")
    owner = as_client(api_app, operator.key)
    doomed = create_key(owner, "operator")
    assert as_client(api_app, doomed["key"]).get("/api/v1/keys").status_code == 200

    # When its owner deletes it
    deleted = owner.delete(f"/api/v1/keys/{doomed['id']}")

    # Then it is gone from the database and the listing, and it gets 401
    assert deleted.status_code == 200, deleted.json
    assert deleted.json == {"deleted": doomed["id"]}
    assert key_row(stack, doomed["id"]) is None
    assert doomed["id"] not in {k["id"] for k in owner.get("/api/v1/keys").json["keys"]}
    assert as_client(api_app, doomed["key"]).get("/api/v1/keys").status_code == 401
    # and deleting it again is a 404
    assert owner.delete(f"/api/v1/keys/{doomed['id']}").status_code == 404


def test_another_users_key_id_answers_404_to_a_non_admin_exactly_like_an_unknown_id(stack, api_app, client):
    # Given bob's key, and alice (an operator) and carol (a viewer)
    bob = make_user(stack, "operator")
    bobs = create_key(as_client(api_app, bob.key), "operator")
    alice = as_client(api_app, make_user(stack, "operator").key)
    carol = as_client(api_app, make_user(stack, "viewer").key)
    unknown = str(uuid.uuid4())

    # When alice or carol try to revoke, rotate or delete bob's key, or a key that does not exist
    for caller in (alice, carol):
        for action in ("revoke", "rotate", "delete"):
            answers = []
            for key_id in (bobs["id"], unknown):
                if action == "delete":
                    response = caller.delete(f"/api/v1/keys/{key_id}")
                else:
                    response = caller.post(f"/api/v1/keys/{key_id}/{action}", json={})
                answers.append(response)

            # Then both answer the same 404 (only the id in the message differs): nothing to probe
            theirs, missing = answers
            assert theirs.status_code == missing.status_code == 404, (action, theirs.json, missing.json)
            assert theirs.json["message"].replace(bobs["id"], "ID") == missing.json["message"].replace(unknown, "ID")
            assert set(theirs.json) == set(missing.json)

    # And bob's key is untouched and still works
    row = key_row(stack, bobs["id"])
    assert (row.state, row.rotated_to, row.expires_at) == ("ACTIVE", None, None)
    assert as_client(api_app, bobs["key"]).get("/api/v1/keys").status_code == 200

    # While an admin may revoke it
    assert client.post(f"/api/v1/keys/{bobs['id']}/revoke").status_code == 200
    assert as_client(api_app, bobs["key"]).get("/api/v1/keys").status_code == 401


def test_a_key_never_has_a_role_its_creator_may_not_grant(stack, api_app, client):
    # Given a viewer, an operator, an admin and an agent
    callers = {
        "viewer": as_client(api_app, make_user(stack, "viewer").key),
        "operator": as_client(api_app, make_user(stack, "operator").key),
        "admin": client,
        "agent": as_client(api_app, make_user(stack, "agent").key),
    }
    # a viewer creates viewer keys only; an operator viewer and operator keys; only an admin creates
    # admin and agent keys; an agent manages no keys at all
    expected = {
        ("viewer", "viewer"): 201,
        ("viewer", "operator"): 403,
        ("viewer", "admin"): 403,
        ("viewer", "agent"): 403,
        ("operator", "viewer"): 201,
        ("operator", "operator"): 201,
        ("operator", "admin"): 403,
        ("operator", "agent"): 403,
        ("admin", "viewer"): 201,
        ("admin", "operator"): 201,
        ("admin", "admin"): 201,
        ("admin", "agent"): 201,
        ("agent", "viewer"): 403,
        ("agent", "agent"): 403,
    }

    # When each creates a key of each role
    got = {}
    for (creator, role), _ in expected.items():
        response = callers[creator].post("/api/v1/keys", json={"name": f"{creator}-makes-{role}", "role": role})
        got[(creator, role)] = response.status_code
        if response.status_code == 201:
            # Then a created key has exactly the asked role
            assert response.json["role"] == role
            assert key_row(stack, response.json["id"]).role == role
        else:
            assert response.json["error"] == "forbidden"

    # Then exactly the allowed ones are created
    assert got == expected


def test_a_viewer_or_operator_holds_at_most_max_keys_per_user_usable_keys_and_an_admin_is_not_capped(
    stack, celery_client
):
    from webapi.app import create_app

    # Given an API with security.max_keys_per_user = 3, and an operator holding one key already
    app = create_app(stack.override(security={"max_keys_per_user": 3}).settings, celery_client)
    operator, admin = make_user(stack, "operator"), make_user(stack, "admin")
    own = authorize(app.test_client(), operator.key)
    # When it makes two more keys / Then both are made
    made = [create_key(own, "operator") for _ in range(2)]
    # And a fourth is refused with 409 naming the setting and the fix, and is not stored
    refused = own.post("/api/v1/keys", json={"name": "one-too-many", "role": "viewer"})
    assert refused.status_code == 409, refused.json
    assert "security.max_keys_per_user (3)" in refused.json["message"] and "revoke" in refused.json["message"]
    assert "one-too-many" not in {k["name"] for k in own.get("/api/v1/keys").json["keys"]}
    # And once it revokes one, it may make one again
    assert own.post(f"/api/v1/keys/{made[0]['id']}/revoke").status_code == 200
    create_key(own, "viewer")
    # And an admin is not capped
    by_admin = authorize(app.test_client(), admin.key)
    for _ in range(4):
        create_key(by_admin, "viewer")
