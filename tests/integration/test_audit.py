"""The audit log on PostgreSQL + Redis: every write, login and logout appends exactly one row.

Each test takes the highest audit id before one request and checks that exactly one row was added
by it, with the right action, principal, role, outcome (success, denied for 401/403/429, failure
otherwise), target and source address. Objects a call needs are made straight in the database first,
so their making is not in the log. Reads write nothing. ``GET /api/v1/audit`` is for admins, filters
by principal, action, outcome and time, and pages newest first without losing or repeating a row.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from aios.models import AuditEntry
from aios.security.roles import ADMIN, OPERATOR, VIEWER
from aios.timeutil import isoformat
from tests.conftest import Credentials, authorize, make_user
from tests.support.rows import (
    audit_rows,
    audit_rows_after,
    last_audit_id,
    make_key,
    make_plain_user,
    make_task,
    new_key,
    user_id,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Person:
    role: str
    name: str
    password: str
    key: str
    id: int


@dataclass
class World:
    stack: Any
    app: Any
    people: dict[str, Person]
    queue: str
    ip: str

    def client(self, who: Person | str | None = None) -> Any:
        """A test client from this module's address, with ``who``'s API key (or a key given as text)."""
        test_client = self.app.test_client()
        test_client.environ_base["REMOTE_ADDR"] = self.ip
        key = who.key if isinstance(who, Person) else who
        return authorize(test_client, key) if key else test_client

    def token(self, person: Person) -> str:
        answer = self.client().post("/api/v1/auth/token", json={"username": person.name, "password": person.password})
        assert answer.status_code == 200, answer.get_json()
        return str(answer.get_json()["access_token"])

    def audited(self, who: Person | str | None, method: str, path: str, **kwargs: Any) -> tuple[Any, AuditEntry]:
        """Send one request; return its answer and the one audit row it added (failing on none or more)."""
        before = last_audit_id(self.stack)
        answer = self.client(who).open(path, method=method, **kwargs)
        rows = audit_rows_after(self.stack, before)
        assert len(rows) == 1, f"{method} {path} wrote {len(rows)} audit rows: " + repr(
            [(row.action, row.principal, row.outcome) for row in rows]
        )
        assert rows[0].source_ip == self.ip
        return answer, rows[0]


def person(stack: Any, credentials: Credentials, role: str) -> Person:
    return Person(
        role=role,
        name=credentials.user,
        password=credentials.password,
        key=credentials.key,
        id=user_id(stack, credentials.user),
    )


@pytest.fixture(scope="module")
def world(stack: Any, api_app: Any) -> World:
    people = {role: person(stack, make_user(stack, role), role) for role in (ADMIN, OPERATOR, VIEWER)}
    ip = f"10.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    return World(stack=stack, app=api_app, people=people, queue=f"q{uuid.uuid4().hex[:12]}", ip=ip)


def fields(row: AuditEntry) -> dict[str, Any]:
    return {
        "action": row.action,
        "principal": row.principal,
        "role": row.role,
        "outcome": row.outcome,
        "target": row.target,
    }


def expect(
    action: str,
    who: Person | None,
    outcome: str,
    target: str | None,
    *,
    principal: str | None = None,
    role: str | None = None,
) -> dict[str, Any]:
    return {
        "action": action,
        "principal": principal or (who.name if who else "anonymous"),
        "role": role if who is None else who.role,
        "outcome": outcome,
        "target": target,
    }


# --------------------------------------------------------------------------- tasks


def test_a_task_submit_writes_one_success_row_naming_the_new_task(world):
    # Given an operator
    operator = world.people[OPERATOR]

    # When it submits a task
    answer, row = world.audited(operator, "POST", "/api/v1/tasks", json={"type": "echo", "queue": world.queue})

    # Then one row: task.submit by the operator, success, on the new task
    assert answer.status_code == 202, answer.get_json()
    assert fields(row) == expect("task.submit", operator, "success", answer.get_json()["id"])
    assert row.detail["type"] == "echo"
    assert row.detail["key"] == operator.key.split("_")[1]  # through which key (its prefix, never the secret)
    assert operator.key.split("_", 2)[2] not in str(row.detail)


def test_a_viewer_submitting_a_task_writes_one_denied_row(world):
    # Given a viewer
    viewer = world.people[VIEWER]

    # When it tries to submit a task
    answer, row = world.audited(viewer, "POST", "/api/v1/tasks", json={"type": "echo", "queue": world.queue})

    # Then it is refused, and one row says so: task.submit by the viewer (role viewer), denied
    assert answer.status_code == 403
    assert fields(row) == expect("task.submit", viewer, "denied", None)
    assert row.detail["status"] == 403


def test_a_submit_without_credentials_writes_one_denied_row_for_anonymous(world):
    # When a task is submitted with no credentials at all
    answer, row = world.audited(None, "POST", "/api/v1/tasks", json={"type": "echo", "queue": world.queue})

    # Then it is a 401, logged as denied for "anonymous"
    assert answer.status_code == 401
    assert fields(row) == expect("task.submit", None, "denied", None)


def test_an_invalid_submit_writes_one_failure_row(world):
    # When an operator submits a task of a type that does not exist
    operator = world.people[OPERATOR]
    answer, row = world.audited(operator, "POST", "/api/v1/tasks", json={"type": "no.such.type"})

    # Then it is a 422, logged as a failure
    assert answer.status_code == 422
    assert fields(row) == expect("task.submit", operator, "failure", None)


def test_a_batch_submit_writes_one_row_for_the_whole_batch(world):
    # When an operator submits a batch of three tasks
    operator = world.people[OPERATOR]
    answer, row = world.audited(
        operator, "POST", "/api/v1/tasks/batch", json={"tasks": [{"type": "echo", "queue": world.queue}] * 3}
    )

    # Then one row (not three): task.submit_batch, success, counting the tasks
    assert answer.status_code == 202, answer.get_json()
    assert fields(row) == expect("task.submit_batch", operator, "success", None)
    assert row.detail["count"] == 3


def test_a_cancel_writes_one_success_row_naming_the_task(world):
    # Given a queued task of an operator
    operator = world.people[OPERATOR]
    task_id = make_task(world.stack, owner=operator.name, queue=world.queue, state="QUEUED")

    # When the operator cancels it
    answer, row = world.audited(operator, "DELETE", f"/api/v1/tasks/{task_id}")

    # Then one row: task.cancel, success, on that task
    assert answer.status_code == 200, answer.get_json()
    assert fields(row) == expect("task.cancel", operator, "success", task_id)


def test_cancelling_a_finished_task_writes_one_failure_row(world):
    # Given a SUCCEEDED task of an operator
    operator = world.people[OPERATOR]
    task_id = make_task(world.stack, owner=operator.name, queue=world.queue, state="SUCCEEDED")

    # When the operator tries to cancel it
    answer, row = world.audited(operator, "DELETE", f"/api/v1/tasks/{task_id}")

    # Then it is a 409, logged as a failure on that task
    assert answer.status_code == 409
    assert fields(row) == expect("task.cancel", operator, "failure", task_id)
    assert row.detail["status"] == 409


def test_cancelling_another_users_task_writes_one_denied_row(world):
    # Given a queued task of the admin
    operator = world.people[OPERATOR]
    task_id = make_task(world.stack, owner=world.people[ADMIN].name, queue=world.queue, state="QUEUED")

    # When an operator tries to cancel it
    answer, row = world.audited(operator, "DELETE", f"/api/v1/tasks/{task_id}")

    # Then it is a 403, logged as denied on that task
    assert answer.status_code == 403
    assert fields(row) == expect("task.cancel", operator, "denied", task_id)


def test_a_retry_writes_one_success_row_naming_the_old_task_and_the_new_one(world):
    # Given a FAILED task of an operator
    operator = world.people[OPERATOR]
    task_id = make_task(world.stack, owner=operator.name, queue=world.queue, state="FAILED")

    # When the operator retries it
    answer, row = world.audited(operator, "POST", f"/api/v1/tasks/{task_id}/retry")

    # Then one row: task.retry, success, on the old task, naming the new one
    assert answer.status_code == 202, answer.get_json()
    assert fields(row) == expect("task.retry", operator, "success", task_id)
    assert row.detail["new_task"] == answer.get_json()["id"]


def test_retrying_an_unfinished_task_writes_one_failure_row(world):
    # Given a QUEUED task of an operator
    operator = world.people[OPERATOR]
    task_id = make_task(world.stack, owner=operator.name, queue=world.queue, state="QUEUED")

    # When the operator tries to retry it
    answer, row = world.audited(operator, "POST", f"/api/v1/tasks/{task_id}/retry")

    # Then it is a 409, logged as a failure
    assert answer.status_code == 409
    assert fields(row) == expect("task.retry", operator, "failure", task_id)


# --------------------------------------------------------------------------- keys


def test_a_key_create_writes_one_success_row_naming_the_new_key_but_not_its_secret(world):
    # When an operator creates a key
    operator = world.people[OPERATOR]
    answer, row = world.audited(operator, "POST", "/api/v1/keys", json={"name": "ci", "role": OPERATOR})

    # Then one row: key.create, success, on the new key; its secret is nowhere in the row
    assert answer.status_code == 201, answer.get_json()
    created = answer.get_json()
    assert fields(row) == expect("key.create", operator, "success", created["id"])
    assert row.detail["prefix"] == created["prefix"]
    assert row.detail["role"] == OPERATOR
    assert created["key"].split("_", 2)[2] not in str(row.detail)


def test_a_key_create_above_the_callers_role_writes_one_denied_row(world):
    # When a viewer asks for an operator key
    viewer = world.people[VIEWER]
    answer, row = world.audited(viewer, "POST", "/api/v1/keys", json={"name": "up", "role": OPERATOR})

    # Then it is a 403, logged as denied, with the role that was asked for
    assert answer.status_code == 403
    assert fields(row) == expect("key.create", viewer, "denied", None)
    assert row.detail["role"] == OPERATOR


@pytest.mark.parametrize(
    ("action", "suffix", "body", "status"),
    [
        ("key.revoke", "/revoke", None, 200),
        ("key.rotate", "/rotate", {"grace_s": 60}, 201),
        ("key.delete", "", None, 200),
    ],
)
def test_a_key_change_by_its_owner_writes_one_success_row_naming_the_key(world, action, suffix, body, status):
    # Given an active key of an operator
    operator = world.people[OPERATOR]
    key_id = make_key(world.stack, owner_id=operator.id, role=OPERATOR)

    # When the operator revokes, rotates or deletes it
    method = "DELETE" if action == "key.delete" else "POST"
    answer, row = world.audited(operator, method, f"/api/v1/keys/{key_id}{suffix}", json=body)

    # Then one row with that action, success, on that key
    assert answer.status_code == status, answer.get_json()
    assert fields(row) == expect(action, operator, "success", key_id)
    if action == "key.rotate":
        assert row.detail["new_key"] == answer.get_json()["id"]


def test_revoking_a_revoked_key_writes_one_failure_row(world):
    # Given a revoked key of an operator
    operator = world.people[OPERATOR]
    key_id = make_key(world.stack, owner_id=operator.id, role=OPERATOR, revoked=True)

    # When the operator revokes it again
    answer, row = world.audited(operator, "POST", f"/api/v1/keys/{key_id}/revoke")

    # Then it is a 409, logged as a failure
    assert answer.status_code == 409
    assert fields(row) == expect("key.revoke", operator, "failure", key_id)


def test_an_admin_activating_a_revoked_key_writes_one_success_row_and_an_operator_one_denied_row(world):
    # Given a revoked key of an operator
    operator, admin = world.people[OPERATOR], world.people[ADMIN]
    key_id = make_key(world.stack, owner_id=operator.id, role=OPERATOR, revoked=True)

    # When the operator tries to activate it, then an admin does
    refused, denied_row = world.audited(operator, "POST", f"/api/v1/keys/{key_id}/activate")
    done, success_row = world.audited(admin, "POST", f"/api/v1/keys/{key_id}/activate")

    # Then one denied row for the operator and one success row for the admin, both on that key
    assert refused.status_code == 403
    assert fields(denied_row) == expect("key.activate", operator, "denied", key_id)
    assert done.status_code == 200, done.get_json()
    assert fields(success_row) == expect("key.activate", admin, "success", key_id)


# --------------------------------------------------------------------------- users


def test_a_user_create_writes_one_success_row_naming_the_user(world):
    # When an admin creates a user
    admin = world.people[ADMIN]
    name = f"made-{uuid.uuid4().hex[:8]}"
    answer, row = world.audited(
        admin, "POST", "/api/v1/users", json={"name": name, "password": f"pw-{uuid.uuid4().hex}", "role": VIEWER}
    )

    # Then one row: user.create, success, on that name; the password is nowhere in the row
    assert answer.status_code == 201, answer.get_json()
    assert fields(row) == expect("user.create", admin, "success", name)
    assert "password" not in str(row.detail) and "pw-" not in str(row.detail)


def test_a_user_create_by_an_operator_writes_one_denied_row(world):
    # When an operator tries to create a user
    operator = world.people[OPERATOR]
    answer, row = world.audited(
        operator,
        "POST",
        "/api/v1/users",
        json={"name": f"nope-{uuid.uuid4().hex[:8]}", "password": "pw-12345678", "role": ADMIN},
    )

    # Then it is a 403, logged as denied
    assert answer.status_code == 403
    assert fields(row) == expect("user.create", operator, "denied", None)


@pytest.mark.parametrize(
    ("body", "action"),
    [
        ({"disabled": True}, "user.disable"),
        ({"disabled": False}, "user.enable"),
        ({"role": OPERATOR}, "user.role_change"),
        ({"password": "a-new-password-123"}, "user.password_change"),
    ],
)
def test_a_user_change_writes_one_success_row_with_its_exact_action(world, body, action):
    # Given a user
    admin = world.people[ADMIN]
    target = make_plain_user(world.stack, VIEWER)

    # When an admin changes it
    answer, row = world.audited(admin, "PATCH", f"/api/v1/users/{target}", json=body)

    # Then one row with the exact action (disable, enable, role change, password change), on that user
    assert answer.status_code == 200, answer.get_json()
    assert fields(row) == expect(action, admin, "success", target)
    assert "a-new-password" not in str(row.detail)
    if action == "user.role_change":
        assert row.detail["role"] == OPERATOR


def test_a_role_change_by_an_operator_writes_one_denied_row_on_that_user(world):
    # Given a user
    operator = world.people[OPERATOR]
    target = make_plain_user(world.stack, VIEWER)

    # When an operator tries to make it an admin
    answer, row = world.audited(operator, "PATCH", f"/api/v1/users/{target}", json={"role": ADMIN})

    # Then it is a 403, logged as a denied user.update on that user (the body was never read)
    assert answer.status_code == 403
    assert fields(row) == expect("user.update", operator, "denied", target)


# --------------------------------------------------------------------------- login, logout


def test_a_login_writes_one_success_row_for_the_username(world):
    # When an operator logs in with its password
    operator = world.people[OPERATOR]
    answer, row = world.audited(
        None, "POST", "/api/v1/auth/token", json={"username": operator.name, "password": operator.password}
    )

    # Then one row: auth.login by that username, success; the password is nowhere in the row
    assert answer.status_code == 200, answer.get_json()
    assert fields(row) == expect("auth.login", None, "success", operator.name, principal=operator.name)
    assert operator.password not in str(row.detail)


@pytest.mark.parametrize("known", [True, False], ids=["known user", "unknown user"])
def test_a_failed_login_writes_one_denied_row_for_the_username(world, known):
    # Given a username (of a real user, or of none) and a wrong password
    username = world.people[VIEWER].name if known else f"ghost-{uuid.uuid4().hex[:8]}"

    # When someone logs in with them
    answer, row = world.audited(
        None, "POST", "/api/v1/auth/token", json={"username": username, "password": "wrong-password-1"}
    )

    # Then it is a 401, logged as denied for that username, without the password
    assert answer.status_code == 401
    assert fields(row) == expect("auth.login", None, "denied", username, principal=username)
    assert "wrong-password" not in str(row.detail)


def test_a_logout_writes_one_success_row(world):
    # Given an operator's token session
    operator = world.people[OPERATOR]
    token = world.token(operator)

    # When it logs out
    answer, row = world.audited(None, "POST", "/api/v1/auth/logout", headers={"Authorization": f"Bearer {token}"})

    # Then one row: auth.logout by the operator, success
    assert answer.status_code == 200, answer.get_json()
    assert fields(row) == expect("auth.logout", operator, "success", operator.name)


# --------------------------------------------------------------------------- reads


def test_reads_write_no_audit_row_whether_allowed_or_refused(world):
    # Given a task, and callers of each kind
    admin, operator, viewer = world.people[ADMIN], world.people[OPERATOR], world.people[VIEWER]
    task_id = make_task(world.stack, owner=operator.name, queue=world.queue, state="SUCCEEDED")
    reads = [
        (viewer, "/api/v1/tasks"),
        (viewer, f"/api/v1/tasks/{task_id}"),
        (operator, "/api/v1/keys"),
        (viewer, "/api/v1/users/me"),
        (admin, "/api/v1/users"),
        (admin, "/api/v1/audit?limit=5"),
        (viewer, "/api/v1/users"),
        (operator, "/api/v1/audit"),
        (viewer, "/api/v1/tasks/no-such-task"),
        (None, "/api/v1/tasks"),
        (None, "/healthz"),
    ]
    before = last_audit_id(world.stack)

    # When they read
    statuses = [world.client(who).get(path).status_code for who, path in reads]

    # Then the reads were answered (some refused) and no audit row was written
    assert statuses == [200, 200, 200, 200, 200, 200, 403, 403, 404, 401, 200]
    assert audit_rows_after(world.stack, before) == []


# --------------------------------------------------------------------------- GET /api/v1/audit


@pytest.fixture(scope="module")
def auditee(world: World) -> dict[str, Any]:
    """A user of its own with six audit rows: three submits, two key creates, one denied user create."""
    name = make_plain_user(world.stack, OPERATOR, prefix="auditee")
    _key_id, key = new_key(world.stack, owner_id=user_id(world.stack, name), role=OPERATOR)
    client = world.client(key)
    for _ in range(3):
        assert client.post("/api/v1/tasks", json={"type": "echo", "queue": world.queue}).status_code == 202
    for index in range(2):
        assert client.post("/api/v1/keys", json={"name": f"k{index}", "role": OPERATOR}).status_code == 201
    assert client.post("/api/v1/users", json={"name": "x", "password": "12345678", "role": VIEWER}).status_code == 403
    rows = audit_rows(world.stack, principal=name)
    assert len(rows) == 6
    return {"name": name, "rows": rows}


def ids(entries: list[dict[str, Any]]) -> list[int]:
    return [entry["id"] for entry in entries]


def test_the_audit_log_is_for_admins_only(world):
    # When an operator and a viewer read the audit log
    refused = [world.client(world.people[role]).get("/api/v1/audit") for role in (OPERATOR, VIEWER)]

    # Then both get 403, while an admin gets entries
    assert [answer.status_code for answer in refused] == [403, 403]
    assert {answer.get_json()["error"] for answer in refused} == {"forbidden"}
    answer = world.client(world.people[ADMIN]).get("/api/v1/audit?limit=5")
    assert answer.status_code == 200
    assert 1 <= len(answer.get_json()["entries"]) <= 5


def test_the_audit_log_filters_by_principal_action_outcome_and_since(world, auditee):
    # Given a principal's six rows, newest first, as stored
    admin = world.client(world.people[ADMIN])
    name, rows = auditee["name"], auditee["rows"]

    # When the log is read by principal
    by_principal = admin.get("/api/v1/audit", query_string={"principal": name}).get_json()

    # Then it holds exactly that principal's rows, newest first, with every field
    assert ids(by_principal["entries"]) == [row.id for row in rows]
    assert by_principal["next_cursor"] is None
    newest = by_principal["entries"][0]
    assert newest["principal"] == name and newest["role"] == OPERATOR
    assert newest["action"] == "user.create" and newest["outcome"] == "denied"
    assert newest["source_ip"] == world.ip and newest["at"] == isoformat(rows[0].at)

    # And by principal and action, and by principal and outcome
    keys = admin.get("/api/v1/audit", query_string={"principal": name, "action": "key.create"}).get_json()
    assert ids(keys["entries"]) == [row.id for row in rows if row.action == "key.create"]
    assert len(keys["entries"]) == 2
    denied = admin.get("/api/v1/audit", query_string={"principal": name, "outcome": "denied"}).get_json()
    assert ids(denied["entries"]) == [rows[0].id]

    # And by action alone: only that action, from anyone
    submits = admin.get("/api/v1/audit", query_string={"action": "task.submit", "limit": 1000}).get_json()
    assert {entry["action"] for entry in submits["entries"]} == {"task.submit"}
    assert {row.id for row in rows if row.action == "task.submit"} <= set(ids(submits["entries"]))

    # And since a time: the rows at or after it
    since = rows[3].at  # the third-oldest row
    later = admin.get("/api/v1/audit", query_string={"principal": name, "since": isoformat(since)}).get_json()
    assert ids(later["entries"]) == [row.id for row in rows if row.at >= since]
    assert rows[3].id in ids(later["entries"]) and rows[4].id not in ids(later["entries"])

    # And a since that is not a time, or has no UTC time (it was a 500), is a 422 naming it
    for value in ("yesterday", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-14:00"):
        wrong = admin.get("/api/v1/audit", query_string={"since": value})
        assert wrong.status_code == 422, (value, wrong.get_json())
        assert wrong.get_json()["field"] == "since"


def test_paging_the_audit_log_two_at_a_time_returns_every_row_once_newest_first(world, auditee):
    # Given a principal's six rows
    admin = world.client(world.people[ADMIN])
    name, rows = auditee["name"], auditee["rows"]

    # When its log is read two rows at a time, following next_cursor
    pages: list[list[int]] = []
    cursor = None
    while True:
        query = {"principal": name, "limit": 2, **({"cursor": cursor} if cursor else {})}
        page = admin.get("/api/v1/audit", query_string=query).get_json()
        pages.append(ids(page["entries"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "next_cursor never ran out"

    # Then there are three full pages, and together they are every row once, newest first
    assert [len(page) for page in pages] == [2, 2, 2]
    walked = [entry_id for page in pages for entry_id in page]
    assert walked == [row.id for row in rows]
    assert walked == sorted(set(walked), reverse=True)


def test_paging_the_whole_audit_log_returns_every_stored_row_once(world):
    # Given the whole log as stored (this module's rows and any others of the session)
    admin = world.client(world.people[ADMIN])
    stored = [row.id for row in audit_rows(world.stack)]

    # When it is read fifty rows at a time, following next_cursor (reads add no rows meanwhile)
    walked: list[int] = []
    cursor = None
    while True:
        page = admin.get("/api/v1/audit", query_string={"limit": 50, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        walked.extend(ids(page.get_json()["entries"]))
        cursor = page.get_json()["next_cursor"]
        if cursor is None:
            break

    # Then every stored row came exactly once, newest first
    assert walked == stored
