"""The original system's agent calls, as it documented them, on PostgreSQL + Redis + real workers.

``PUT /api/v1/agents/{id}`` with ``{"status": "IDLE"}`` (or OFFLINE, ERROR) and ``POST /api/v1/agents``
with ``{"type": ..., "capabilities": [...]}`` and no name. The mapping is in
:func:`aios.agents.registry.admin_status_for`; docs/api.md has the "Coming from the original" table.
The migration that adds ``agents.type`` is checked both ways on PostgreSQL and SQLite.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from aios import migrate
from aios.config import DatabaseSettings
from aios.db import dispose_engines, get_engine
from tests.conftest import authorize, make_user
from tests.support.agent_helpers import (
    FAST_BEATS,
    disable_stray_agents,
    get_agent,
    submit,
    wait_agent_status,
    wait_all_terminal,
    wait_routable,
)
from tests.support.rows import audit_rows_after, last_audit_id

pytestmark = pytest.mark.integration

GENERATED = re.compile(r"^text_processing-[0-9a-f]{6}$")


@pytest.fixture(autouse=True)
def no_other_healthy_agent(client: Any) -> None:
    """Agents of earlier tests must not take this test's work."""
    disable_stray_agents(client)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def audited(stack: Any, call: Any) -> tuple[Any, Any]:
    """Make one request; return its answer and the one audit row it added (failing on none or more)."""
    before = last_audit_id(stack)
    answer = call()
    rows = audit_rows_after(stack, before)
    assert len(rows) == 1, [(r.action, r.target, r.detail) for r in rows]
    return answer, rows[0]


def put_status(client: Any, name: str, status: Any) -> Any:
    return client.put(f"/api/v1/agents/{name}", json={"status": status})


# --------------------------------------------------------------------------- PUT /agents/{id}


def test_the_originals_statuses_disable_and_enable_a_running_agent_and_each_call_is_audited(
    client, start_worker, stack
):
    # Given a running agent
    worker = start_worker([], name=unique("orig"), env=FAST_BEATS)
    wait_routable(client, worker.hostname)

    for original, admin_status, status in (("OFFLINE", "DISABLED", "DISABLED"), ("ERROR", "DISABLED", "DISABLED")):
        # When its status is set to the original's OFFLINE (or ERROR)
        answer, row = audited(stack, lambda s=original: put_status(client, worker.hostname, s))

        # Then it is disabled, as PATCH {"status": "DISABLED"} would, and its heartbeats keep it so
        assert answer.status_code == 200, answer.json
        assert (answer.json["admin_status"], answer.json["status"]) == (admin_status, status)
        assert answer.json["status_reason"] == "disabled by an operator"
        assert wait_agent_status(client, worker.hostname, "DISABLED")["admin_status"] == "DISABLED"
        # And the call is audited like PATCH, with the status as sent and what it meant
        assert (row.action, row.target, row.outcome) == ("agent.update", worker.hostname, "success")
        assert (row.detail["agent_status"], row.detail["status"]) == (original, 200)
        assert row.detail["admin_status"] == "DISABLED"

        # When it is set to IDLE / Then it is enabled again: ONLINE, taking work
        answer, row = audited(stack, lambda: put_status(client, worker.hostname, "IDLE"))
        assert answer.status_code == 200, answer.json
        assert answer.json["admin_status"] == "ACTIVE"
        assert answer.json["status"] in ("ONLINE", "BUSY")
        assert row.action == "agent.update"
        assert (row.detail["agent_status"], row.detail["admin_status"]) == ("IDLE", "ONLINE")
        task = wait_all_terminal(client, [submit(client, {"type": "echo", "parameters": {"n": 1}})])
        assert [(t["state"], t["agent"]) for t in task.values()] == [("SUCCEEDED", worker.hostname)]

    # And AIOS's own statuses work through PUT too (DRAINING here)
    drained = put_status(client, worker.hostname, "DRAINING")
    assert (drained.status_code, drained.json["status"]) == (200, "DRAINING"), drained.json
    assert put_status(client, worker.hostname, "ONLINE").json["admin_status"] == "ACTIVE"


def test_busy_is_refused_because_heartbeats_decide_it_and_bad_statuses_are_422_naming_the_accepted_ones(
    client, stack, api_app
):
    # Given a registered agent, enabled
    name = client.post("/api/v1/agents", json={"name": f"{unique('busy')}@x"}).json["name"]

    # When a client reports it BUSY, as the original let it
    refused, row = audited(stack, lambda: put_status(client, name, "BUSY"))

    # Then it is a 409 that says AIOS computes BUSY, and nothing changed; the refusal is audited
    assert refused.status_code == 409, refused.json
    assert refused.json["error"] == "conflict"
    assert refused.json["field"] == "status"
    assert "computes it from the agent's heartbeats" in refused.json["message"]
    assert "send IDLE" in refused.json["message"]
    assert get_agent(client, name)["admin_status"] == "ACTIVE"
    assert (row.action, row.target, row.outcome) == ("agent.update", name, "failure")
    assert (row.detail["agent_status"], row.detail["status"]) == ("BUSY", 409)
    assert put_status(client, name, "DEGRADED").status_code == 409

    # When the status is unknown, not a string, lower case, missing, or comes with other fields
    for body in (
        {"status": "SLEEPING"},
        {"status": "idle"},
        {"status": 1},
        {},
        {"status": "IDLE", "type": "gpu"},
        {"status": "IDLE", "weight": 2},
    ):
        answer = client.put(f"/api/v1/agents/{name}", json=body)
        # Then each is a 422 with an error and a message (the unknown status names what is accepted)
        assert answer.status_code == 422, (body, answer.json)
        assert answer.json["error"] == "validation_failed"
        assert answer.json["message"]
    unknown = put_status(client, name, "SLEEPING").json
    assert unknown["field"] == "status"
    for accepted in ("IDLE", "OFFLINE", "ERROR", "ONLINE", "DRAINING", "DISABLED"):
        assert accepted in unknown["message"]
    assert get_agent(client, name)["admin_status"] == "ACTIVE"

    # And an unknown agent is a 404, a viewer is refused, an anonymous caller is 401
    assert put_status(client, f"nobody-{uuid.uuid4().hex[:6]}@nowhere", "IDLE").status_code == 404
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    assert put_status(viewer, name, "OFFLINE").status_code == 403
    assert put_status(api_app.test_client(), name, "OFFLINE").status_code == 401
    assert get_agent(client, name)["admin_status"] == "ACTIVE"


# --------------------------------------------------------------------------- POST /agents with a type


def test_registering_with_a_type_and_no_name_generates_a_readable_unique_name_and_shows_the_type(
    client, stack, api_app
):
    # When an agent is registered the original's way: a type and capabilities, no name
    body = {"type": "text_processing", "capabilities": ["summarize", "translate"]}
    first, row = audited(stack, lambda: client.post("/api/v1/agents", json=body))
    second = client.post("/api/v1/agents", json=body)

    # Then each gets a name of its own, <type>-<6 hex>, and shows its type, which is a capability too
    assert first.status_code == 201, first.json
    assert second.status_code == 201, second.json
    assert GENERATED.match(first.json["name"]), first.json["name"]
    assert GENERATED.match(second.json["name"]), second.json["name"]
    assert first.json["name"] != second.json["name"]
    assert first.json["type"] == "text_processing"
    assert first.json["capabilities"] == ["summarize", "text_processing", "translate"]
    shown = get_agent(client, first.json["name"])
    assert (shown["type"], shown["capabilities"]) == ("text_processing", ["summarize", "text_processing", "translate"])
    listed = client.get("/api/v1/agents?capability=text_processing").json["agents"]
    assert {first.json["name"], second.json["name"]} <= {a["name"] for a in listed}
    # And the audit row names the agent it made and its type
    assert (row.action, row.target, row.outcome) == ("agent.register", first.json["name"], "success")
    assert row.detail["type"] == "text_processing"

    # When neither a name nor a type is sent / Then the name is agent-<6 hex> and the type null
    plain = client.post("/api/v1/agents", json={})
    assert plain.status_code == 201, plain.json
    assert re.fullmatch(r"agent-[0-9a-f]{6}", plain.json["name"]), plain.json
    assert plain.json["type"] is None

    # When an agent key registers by type / Then the name carries its user, as its agents' names must
    agent_user = make_user(stack, "agent")
    as_agent = authorize(api_app.test_client(), agent_user.key)
    own = as_agent.post("/api/v1/agents", json={"type": "text_processing"})
    assert own.status_code == 201, own.json
    assert re.fullmatch(rf"{re.escape(agent_user.user)}@text_processing-[0-9a-f]{{6}}", own.json["name"]), own.json

    # And a type that is no capability name, or a name in use, is refused
    for bad in ({"type": "text processing!"}, {"type": ""}, {"type": 7}, {"type": "t", "colour": "red"}):
        answer = client.post("/api/v1/agents", json=bad)
        assert answer.status_code == 422, (bad, answer.json)
        assert answer.json["error"] == "validation_failed" and answer.json["message"]
    again = client.post("/api/v1/agents", json={"name": first.json["name"], "type": "text_processing"})
    assert again.status_code == 409, again.json


def test_an_agents_type_routes_to_it_as_a_capability_it_keeps_when_it_starts_and_when_its_list_is_replaced(
    client, start_worker
):
    # Given agent A registered ahead with type "sleep", then started (announcing its own capabilities),
    # and agent B started without a type
    tag = uuid.uuid4().hex[:6]
    a_name, b_name = f"typed-{tag}", f"plain-{tag}"
    made = client.post("/api/v1/agents", json={"name": f"{a_name}@aios-test", "type": "sleep"})
    assert made.status_code == 201, made.json
    a = start_worker([], name=a_name, env=FAST_BEATS)
    b = start_worker([], name=b_name, env=FAST_BEATS)
    wait_routable(client, a.hostname, b.hostname)
    assert get_agent(client, a.hostname)["type"] == "sleep"
    assert "sleep" in get_agent(client, a.hostname)["capabilities"]

    # When an operator replaces both agents' capabilities with ["echo"]
    for name in (a.hostname, b.hostname):
        patched = client.patch(f"/api/v1/agents/{name}", json={"capabilities": ["echo"]})
        assert patched.status_code == 200, patched.json

    # Then A keeps its type among them, B has echo alone
    assert get_agent(client, a.hostname)["capabilities"] == ["echo", "sleep"]
    assert get_agent(client, b.hostname)["capabilities"] == ["echo"]
    wait_routable(client, a.hostname, b.hostname)

    # And sleep tasks all go to A (its type), echo tasks to both
    sleeps = [submit(client, {"type": "sleep", "parameters": {"seconds": 0}}) for _ in range(4)]
    echoes = [submit(client, {"type": "echo", "parameters": {"n": n}}) for n in range(4)]
    tasks = wait_all_terminal(client, sleeps + echoes)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
    assert Counter(tasks[t]["agent"] for t in sleeps) == Counter({a.hostname: 4})
    assert set(Counter(tasks[t]["agent"] for t in echoes)) == {a.hostname, b.hostname}


# --------------------------------------------------------------------------- the migration


def _migrated_both_ways(settings: DatabaseSettings) -> None:
    """Upgrade to head; an agent with a type and a status history; down to 0010 and up again."""
    migrate.upgrade(settings)
    engine = get_engine(settings)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO agents (name, type, capabilities, labels, weight, max_concurrency, admin_status,"
                " status, active, processed, registered_at, updated_at) VALUES ('m@x', 'text_processing',"
                " '[\"text_processing\"]', '{}', 1, 1, 'ACTIVE', 'OFFLINE', 0, 0, :now, :now)"
            ),
            {"now": "2026-01-01 00:00:00"},
        )
        connection.execute(
            sa.text("INSERT INTO agent_events (agent, at, to_status) VALUES ('m@x', :now, 'OFFLINE')"),
            {"now": "2026-01-01 00:00:00"},
        )

    def columns() -> set[str]:
        with engine.connect() as connection:
            return {c["name"] for c in sa.inspect(connection).get_columns("agents")}

    assert "type" in columns()
    # When downgraded to 0010 / Then the column is gone, and the agent's status history is still there
    migrate.downgrade(settings, "0010_idempotency_per_owner")
    assert "type" not in columns()
    with engine.connect() as connection:
        assert connection.scalar(sa.text("SELECT count(*) FROM agent_events WHERE agent = 'm@x'")) == 1
    # When upgraded again / Then the column is back (empty) and the agent is untouched
    migrate.upgrade(settings)
    assert "type" in columns()
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT name, type FROM agents WHERE name = 'm@x'")).all() == [("m@x", None)]


def test_the_agent_type_migration_goes_down_and_up_on_postgresql_keeping_status_history():
    from tests.support.schemas import private_schema

    with private_schema("agtype") as url:
        _migrated_both_ways(DatabaseSettings(url=url))


def test_the_agent_type_migration_goes_down_and_up_on_sqlite_keeping_status_history(tmp_path: Path):
    try:
        _migrated_both_ways(DatabaseSettings(url=f"sqlite:///{tmp_path}/agents.db"))
    finally:
        dispose_engines()
