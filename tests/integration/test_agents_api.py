"""/api/v1/agents on PostgreSQL + Redis + real workers: draining, disabling and re-enabling agents,
a DEGRADED agent that routing avoids, and the registry routes themselves.

Workers beat every second here, so their status follows within a second or two.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from aios.agents.registry import agent_queue
from tests.conftest import authorize, make_user, wait_for
from tests.support.agent_helpers import (
    FAST_BEATS,
    disable_stray_agents,
    get_agent,
    read_task,
    submit,
    wait_agent_status,
    wait_all_terminal,
    wait_routable,
    wait_task_state,
)

pytestmark = pytest.mark.integration

RESOURCE_FIGURES = {"cpu_pct", "memory_pct", "load_avg", "disk_pct", "rss_bytes"}


@pytest.fixture(autouse=True)
def no_other_healthy_agent(client: Any) -> None:
    """Agents of earlier tests must not take this test's work."""
    disable_stray_agents(client)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def echo_batch(client: Any, count: int, **fields: Any) -> list[str]:
    return [submit(client, {"type": "echo", "parameters": {"n": n}, **fields}) for n in range(count)]


def agents_of(client: Any, task_ids: list[str]) -> Counter[str]:
    tasks = wait_all_terminal(client, task_ids, timeout=60)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
    return Counter(t["agent"] for t in tasks.values())


def patch(client: Any, name: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.patch(f"/api/v1/agents/{name}", json=body)
    assert response.status_code == 200, response.json
    return response.json


def test_a_draining_agent_finishes_its_running_task_takes_no_new_ones_and_takes_work_again_once_online(
    client, start_worker
):
    # Given two agents (one pool process each), a sleep running on one of them (the one to drain),
    # and an echo waiting QUEUED behind it (round robin alternates)
    one = start_worker([], name=unique("da"), env=FAST_BEATS)
    two = start_worker([], name=unique("db"), env=FAST_BEATS)
    wait_routable(client, one.hostname, two.hostname)
    running = submit(client, {"type": "sleep", "parameters": {"seconds": 3}})
    drained = wait_task_state(client, running, "RUNNING")["agent"]
    other = two.hostname if drained == one.hostname else one.hostname
    (behind,) = [t for t in echo_batch(client, 2) if read_task(client, t)["queue"] == agent_queue(drained)]
    assert read_task(client, behind)["state"] == "QUEUED"

    # When it is drained
    agent = patch(client, drained, {"status": "DRAINING"})

    # Then it is DRAINING, with the reason, and stays so while it beats
    assert agent["status"] == "DRAINING"
    assert agent["admin_status"] == "DRAINING"
    assert agent["status_reason"] == "draining: finishing its tasks, taking no new ones"
    assert get_agent(client, drained)["status"] == "DRAINING"

    # And the task queued behind its sleep moved to the other agent and ran there, once
    task = wait_task_state(client, behind, "SUCCEEDED", "FAILED", "DEAD")
    assert (task["state"], task["agent"], task["attempts"]) == ("SUCCEEDED", other, 1)
    moved = [e for e in task["events"] if e["from_state"] == "QUEUED" and e["to_state"] == "PENDING"]
    assert [e["detail"] for e in moved] == [{"reason": "agent draining", "agent": drained}]

    # And every task submitted meanwhile goes to the other agent
    while_draining = echo_batch(client, 6)
    assert agents_of(client, while_draining) == Counter({other: 6})

    # And its running task still finishes there
    task = wait_task_state(client, running, "SUCCEEDED", "FAILED", "DEAD", "RETRYING", timeout=30)
    assert task["state"] == "SUCCEEDED"
    assert task["agent"] == drained
    assert task["attempts"] == 1
    assert get_agent(client, drained)["active_tasks"] == []
    # (the stale copy of the moved echo, still in its queue, reaches it afterwards and is skipped)
    skipped = wait_for(
        lambda: [
            e
            for e in read_task(client, behind)["events"]
            if (e["detail"] or {}).get("note") == "delivery skipped: stale dispatch"
        ],
        timeout=10,
        what="the stale delivery to be skipped",
    )
    assert skipped[0]["actor"] == f"worker:{drained}"
    assert read_task(client, behind)["state"] == "SUCCEEDED"
    # (and its next heartbeat reports it idle)
    wait_for(lambda: get_agent(client, drained)["active"] == 0, timeout=10, what="an idle heartbeat")

    # When it is disabled, it is DISABLED and takes nothing either
    agent = patch(client, drained, {"status": "DISABLED"})
    assert agent["status"] == "DISABLED"
    assert agent["status_reason"] == "disabled by an operator"
    while_disabled = echo_batch(client, 6)
    assert agents_of(client, while_disabled) == Counter({other: 6})
    assert get_agent(client, drained)["status"] == "DISABLED", "its heartbeats keep it DISABLED"

    # When it is set back ONLINE
    agent = patch(client, drained, {"status": "ONLINE"})

    # Then it is ONLINE and round robin gives it its share again
    assert agent["status"] == "ONLINE"
    assert agent["admin_status"] == "ACTIVE"
    assert agent["status_reason"] == "healthy"
    back_online = echo_batch(client, 6)
    assert agents_of(client, back_online) == Counter({drained: 3, other: 3})

    # And its agent events tell the story: DRAINING, then DISABLED, then ONLINE, each with a reason
    events = get_agent(client, drained)["events"]  # newest first
    story = [e for e in reversed(events) if e["to_status"] in ("DRAINING", "DISABLED", "ONLINE")]
    assert [(e["to_status"], e["reason"]) for e in story][-3:] == [
        ("DRAINING", "draining: finishing its tasks, taking no new ones"),
        ("DISABLED", "disabled by an operator"),
        ("ONLINE", "healthy"),
    ]
    assert story[-3]["from_status"] in ("ONLINE", "BUSY")
    assert story[-2]["from_status"] == "DRAINING"
    assert story[-1]["from_status"] == "DISABLED"


def test_an_agent_over_its_memory_threshold_is_degraded_and_least_loaded_routing_avoids_it(client, start_worker):
    # Given a normal agent, and one whose memory threshold (1 %) is below what the host uses
    normal = start_worker([], name=unique("ma"), env=FAST_BEATS)
    sick = start_worker([], name=unique("mb"), env={**FAST_BEATS, "AIOS_AGENTS__MEMORY_DEGRADED_PCT": "1"})

    # When both have sent a heartbeat
    wait_routable(client, normal.hostname)
    agent = wait_agent_status(client, sick.hostname, "DEGRADED")

    # Then the second is DEGRADED, and the reason names the figure and the threshold
    memory = agent["resources"]["memory_pct"]
    assert memory > 1
    assert agent["status_reason"] == (f"memory {memory:.0f}% is above the threshold agents.memory_degraded_pct = 1%")
    assert agent["events"][0]["to_status"] == "DEGRADED"
    assert agent["events"][0]["reason"].startswith("memory ")

    # And least_loaded sends all of 20 tasks to the normal agent
    ids = echo_batch(client, 20, routing="least_loaded")
    assert agents_of(client, ids) == Counter({normal.hostname: 20})
    assert all(read_task(client, t)["queue"] == agent_queue(normal.hostname) for t in ids)
    assert get_agent(client, sick.hostname)["status"] == "DEGRADED"
    assert get_agent(client, sick.hostname)["recent_tasks"] == []


def test_the_agents_api_registers_lists_shows_updates_and_deletes_agents(client, start_worker, stack, api_app):
    # Given a running agent
    worker = start_worker([], name=unique("api"), env=FAST_BEATS)
    wait_routable(client, worker.hostname)

    # When an operator registers an agent ahead of its first heartbeat
    ahead = f"{unique('ahead')}@elsewhere"
    response = client.post(
        "/api/v1/agents", json={"name": ahead, "capabilities": ["gpu", "echo"], "labels": {"zone": "b"}, "weight": 2}
    )

    # Then it is created, OFFLINE until it beats; the same name again is a conflict
    assert response.status_code == 201, response.json
    assert response.json["status"] == "OFFLINE"
    assert response.json["status_reason"] == "registered, no heartbeat yet"
    assert response.json["capabilities"] == ["echo", "gpu"]
    assert response.json["labels"] == {"zone": "b"}
    assert response.json["weight"] == 2
    again = client.post("/api/v1/agents", json={"name": ahead})
    assert again.status_code == 409, again.json

    # And an agent key may register only agents named after its own user
    agent_user = make_user(stack, "agent")
    as_agent = authorize(api_app.test_client(), agent_user.key)
    own = as_agent.post("/api/v1/agents", json={"name": f"{agent_user.user}@x"})
    assert own.status_code == 201, own.json
    other = as_agent.post("/api/v1/agents", json={"name": f"someone-else-{uuid.uuid4().hex[:6]}@x"})
    assert other.status_code == 403, other.json

    # When the agents are listed by status and capability
    online_echo = client.get("/api/v1/agents?status=ONLINE&capability=echo").json["agents"]
    offline_gpu = client.get("/api/v1/agents?status=OFFLINE&capability=gpu").json["agents"]
    online_gpu = client.get("/api/v1/agents?status=ONLINE,BUSY&capability=gpu").json["agents"]
    everyone = client.get("/api/v1/agents").json["agents"]

    # Then each filter applies
    assert [a["name"] for a in online_echo] == [worker.hostname]
    assert ahead in [a["name"] for a in offline_gpu]
    assert f"{agent_user.user}@x" not in [a["name"] for a in offline_gpu]
    assert online_gpu == []
    assert {worker.hostname, ahead, f"{agent_user.user}@x"} <= {a["name"] for a in everyone}
    assert client.get("/api/v1/agents?status=ASLEEP").status_code == 422
    assert client.get("/api/v1/agents?colour=red").status_code == 422

    # When the agent has run an echo and is running a sleep, and is read
    finished = submit(client, {"type": "echo", "parameters": {"hello": "world"}})
    wait_task_state(client, finished, "SUCCEEDED")
    running = submit(client, {"type": "sleep", "parameters": {"seconds": 4}})
    wait_task_state(client, running, "RUNNING")
    agent = get_agent(client, worker.hostname)

    # Then it shows its running task, its recent tasks and its heartbeat figures
    assert [t["id"] for t in agent["active_tasks"]] == [running]
    assert {running, finished} <= {t["id"] for t in agent["recent_tasks"]}
    assert RESOURCE_FIGURES <= set(agent["resources"])
    assert 0 <= agent["resources"]["memory_pct"] <= 100
    assert len(agent["resources"]["load_avg"]) == 3
    assert agent["resources"]["rss_bytes"] > 0
    agent = wait_agent_status(client, worker.hostname, "BUSY", timeout=10)
    assert agent["active"] == 1
    assert agent["status_reason"] == "running 1 of 1 tasks"
    assert agent["processed"] >= 1
    assert agent["last_heartbeat_at"] is not None

    # When its weight and capabilities are changed
    changed = patch(client, worker.hostname, {"weight": 5, "capabilities": ["echo", "sleep", "render"]})

    # Then they are stored (and survive its next heartbeats)
    assert changed["weight"] == 5
    assert changed["capabilities"] == ["echo", "render", "sleep"]
    wait_task_state(client, running, "SUCCEEDED", timeout=30)
    agent = get_agent(client, worker.hostname)
    assert (agent["weight"], agent["capabilities"]) == (5, ["echo", "render", "sleep"])

    # And a viewer may read agents but not change them
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    assert viewer.get(f"/api/v1/agents/{worker.hostname}").status_code == 200
    assert viewer.patch(f"/api/v1/agents/{worker.hostname}", json={"weight": 9}).status_code == 403
    assert get_agent(client, worker.hostname)["weight"] == 5

    # And an agent that is not OFFLINE cannot be deleted; an OFFLINE one can, and is gone
    refused = client.delete(f"/api/v1/agents/{worker.hostname}")
    assert refused.status_code == 409, refused.json
    assert refused.json["error"] == "conflict"
    assert refused.json["agent_status"] in ("ONLINE", "BUSY")
    assert get_agent(client, worker.hostname)["status"] in ("ONLINE", "BUSY"), "it is still there"
    deleted = client.delete(f"/api/v1/agents/{ahead}")
    assert deleted.status_code == 200, deleted.json
    assert client.get(f"/api/v1/agents/{ahead}").status_code == 404
    assert client.delete(f"/api/v1/agents/{ahead}").status_code == 404

    # And unknown agents are 404 everywhere
    unknown = f"nobody-{uuid.uuid4().hex[:6]}@nowhere"
    assert client.get(f"/api/v1/agents/{unknown}").status_code == 404
    assert client.patch(f"/api/v1/agents/{unknown}", json={"weight": 2}).status_code == 404
    assert client.delete(f"/api/v1/agents/{unknown}").status_code == 404


# --------------------------------------------------------------------------- max_agents and placeholders


def test_placeholders_filling_max_agents_never_stop_a_real_agent_but_one_real_agent_too_many_is_refused(
    stack, celery_client, start_worker, queue
):
    from tests.support.schemas import private_schema
    from webapi.app import create_app

    with private_schema("agents") as url:
        # Given a ledger of its own with orchestrator.max_agents = 2, and an operator
        limits = {"AIOS_DATABASE__URL": url, "AIOS_ORCHESTRATOR__MAX_AGENTS": "2", **FAST_BEATS}
        own = stack.override(database={"url": url}, orchestrator={"max_agents": 2})
        app = create_app(own.settings, celery_client)
        operator = authorize(app.test_client(), make_user(own, "operator").key)
        admin = authorize(app.test_client(), make_user(own, "admin").key)
        tag = uuid.uuid4().hex[:6]
        first, second, third = (f"{name}-{tag}" for name in ("first", "second", "third"))

        # When the operator registers placeholders up to max_agents through the API (one of them with
        # the name a real agent will start with)
        for name in (f"placeholder-{tag}@nowhere", f"{second}@aios-test"):
            made = operator.post("/api/v1/agents", json={"name": name, "capabilities": ["echo"]})
            assert made.status_code == 201, made.json
        # Then a third placeholder is refused: placeholders have a cap too
        over = operator.post("/api/v1/agents", json={"name": f"over-{tag}@nowhere"})
        assert over.status_code == 409, over.json
        assert "orchestrator.max_agents (2)" in over.json["message"]

        # When real agents start, one new and one with a placeholder's name
        workers = [start_worker([queue], name=name, env=limits) for name in (first, second)]
        try:
            # Then both start and heartbeat fine: placeholders took no place of theirs
            for worker in workers:
                agent = wait_agent_status(admin, worker.hostname, "ONLINE", "BUSY")
                assert agent["last_heartbeat_at"], agent
            assert "Unrecoverable error" not in workers[0].log() + workers[1].log()

            # And a real agent beyond max_agents heartbeating agents is refused, naming the setting
            with pytest.raises(AssertionError) as refused:
                start_worker([queue], name=third, env=limits)
            assert "orchestrator.max_agents (2) agents have sent heartbeats already" in str(refused.value), str(
                refused.value
            )[-3000:]
            assert admin.get(f"/api/v1/agents/{third}@aios-test").status_code == 404
        finally:
            for worker in workers:
                worker.stop()
