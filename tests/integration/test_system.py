"""/api/v1/system: resources of the API host and the agents, and limits changed at run time."""

from __future__ import annotations

import pytest

from aios.db import session_scope
from aios.models import Agent
from tests.conftest import authorize, make_user, wait_for

pytestmark = pytest.mark.integration

HEARTBEAT_S = 1.0


def agent_row(stack, name: str) -> Agent | None:
    with session_scope(stack.settings.database) as session:
        agent = session.get(Agent, name)
        if agent is not None:
            session.expunge(agent)
        return agent


@pytest.mark.slow
def test_a_lower_memory_threshold_makes_an_agent_degraded_within_two_heartbeats_and_clearing_it_brings_it_back(
    client, stack, queue, start_worker
):
    # Given an agent beating every second, ONLINE, with its memory use reported
    worker = start_worker([queue], env={"AIOS_AGENTS__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S)})
    reported = wait_for(
        lambda: (
            (a := agent_row(stack, worker.hostname))
            and a.status == "ONLINE"
            and (a.resources or {}).get("memory_pct")
            and a
        ),
        timeout=20,
        what="an ONLINE agent",
    )
    memory_pct = reported.resources["memory_pct"]
    try:
        # When an admin sets the memory threshold below what the agent uses
        answer = client.put("/api/v1/system/limits", json={"memory_degraded_pct": max(1.0, memory_pct / 2)})
        assert answer.status_code == 200, answer.json
        assert answer.json["limits"]["memory_degraded_pct"] == max(1.0, memory_pct / 2)
        assert "memory_degraded_pct" in answer.json["overridden"]

        # Then the agent turns DEGRADED at its next heartbeats, saying why
        degraded = wait_for(
            lambda: (a := agent_row(stack, worker.hostname)) and a.status == "DEGRADED" and a,
            timeout=2 * HEARTBEAT_S + 20,
            interval=0.1,
            what="the agent to turn DEGRADED",
        )
        assert "memory" in degraded.status_reason
    finally:
        # When the override is cleared (back to the config's default)
        cleared = client.put("/api/v1/system/limits", json={"memory_degraded_pct": None})
    assert cleared.status_code == 200 and "memory_degraded_pct" not in cleared.json["overridden"]
    assert cleared.json["limits"]["memory_degraded_pct"] == stack.settings.agents.memory_degraded_pct

    # Then it is ONLINE again at its next heartbeats
    wait_for(
        lambda: agent_row(stack, worker.hostname).status == "ONLINE",
        timeout=2 * HEARTBEAT_S + 20,
        interval=0.1,
        what="the agent to be ONLINE again",
    )


def test_limits_are_read_by_viewers_changed_by_admins_only_and_checked(api_app, stack, client):
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    operator = authorize(api_app.test_client(), make_user(stack, "operator").key)
    shown = viewer.get("/api/v1/system/limits").json
    assert set(shown["limits"]) == {
        "cpu_degraded_pct",
        "memory_degraded_pct",
        "disk_degraded_pct",
        "command_cpu_s",
        "command_memory_mb",
        "command_wall_s",
        "command_output_kb",
        "command_pids",
        "command_file_size_mb",
    }
    assert operator.put("/api/v1/system/limits", json={"command_cpu_s": 5}).status_code == 403
    for bad, field in [
        ({"memory_degraded_pct": 0}, "memory_degraded_pct"),
        ({"memory_degraded_pct": 101}, "memory_degraded_pct"),
        ({"command_cpu_s": "5"}, "command_cpu_s"),
        ({"nonsense": 1}, "nonsense"),
    ]:
        answer = client.put("/api/v1/system/limits", json=bad)
        assert answer.status_code == 422 and answer.json["field"] == field, answer.json
    assert viewer.get("/api/v1/system/limits").json == shown  # nothing changed


def test_resources_show_the_api_host_and_every_agents_last_figures(api_app, stack, queue, start_worker):
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    worker = start_worker([queue], env={"AIOS_AGENTS__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S)})
    wait_for(lambda: (a := agent_row(stack, worker.hostname)) and a.resources, timeout=20, what="a heartbeat")
    answer = viewer.get("/api/v1/system/resources").json
    assert 0 <= answer["api"]["memory_pct"] <= 100 and answer["api"]["cpu_count"] >= 1
    mine = [agent for agent in answer["agents"] if agent["name"] == worker.hostname]
    assert len(mine) == 1 and {"cpu_pct", "memory_pct", "disk_pct", "rss_bytes"} <= set(mine[0]["resources"])
