"""Helpers for the agent integration tests: read agents over the API, wait for their status, clear
strays left by earlier tests, and kill a worker's whole process tree.

Workers in these tests beat every second (``FAST_BEATS``), so an agent that stops beating is OFFLINE
after three seconds (the default timeout is three intervals).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import psutil

from aios.agents import registry as agent_ledger
from tests.conftest import wait_for

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 3 * HEARTBEAT_INTERVAL_S
#: Environment of a worker that beats every second.
FAST_BEATS = {"AIOS_AGENTS__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_INTERVAL_S)}
#: Task states after which nothing more happens to a task.
TERMINAL = ("SUCCEEDED", "FAILED", "DEAD", "CANCELLED", "TIMED_OUT")


def get_agent(client: Any, name: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/agents/{name}")
    assert response.status_code == 200, response.json
    return response.json


def wait_agent_status(
    client: Any, name: str, *statuses: str, timeout: float = 30.0, interval: float = 0.1
) -> dict[str, Any]:
    """Poll GET /api/v1/agents/{name} until its status is one of ``statuses``; returns the agent."""
    return wait_for(
        lambda: (agent := get_agent(client, name))["status"] in statuses and agent,
        timeout=timeout,
        interval=interval,
        what=f"agent {name} to be {'/'.join(statuses)}",
    )


def wait_routable(client: Any, *names: str, timeout: float = 30.0) -> None:
    """Wait until every agent is ONLINE (or BUSY), then past the API's healthy-set cache."""
    for name in names:
        wait_agent_status(client, name, "ONLINE", "BUSY", timeout=timeout)
    time.sleep(agent_ledger.HEALTHY_CACHE_S + 0.1)


def disable_stray_agents(client: Any) -> list[str]:
    """PATCH to DISABLED every agent an earlier test left neither OFFLINE nor DISABLED."""
    response = client.get("/api/v1/agents")
    assert response.status_code == 200, response.json
    strays = [a["name"] for a in response.json["agents"] if a["status"] not in ("OFFLINE", "DISABLED")]
    for name in strays:
        patched = client.patch(f"/api/v1/agents/{name}", json={"status": "DISABLED"})
        assert patched.status_code == 200, patched.json
    return strays


def submit(client: Any, body: dict[str, Any]) -> str:
    response = client.post("/api/v1/tasks", json=body)
    assert response.status_code == 202, response.json
    return response.json["id"]


def read_task(client: Any, task_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/tasks/{task_id}")
    assert response.status_code == 200, response.json
    return response.json


def wait_all_terminal(client: Any, task_ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Wait until every task is in a terminal state; returns id → task (with its events)."""

    def done() -> dict[str, dict[str, Any]] | None:
        tasks = {task_id: read_task(client, task_id) for task_id in task_ids}
        return tasks if all(t["state"] in TERMINAL for t in tasks.values()) else None

    return wait_for(done, timeout=timeout, interval=0.25, what=f"{len(task_ids)} task(s) to finish")


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a worker and every process under it (its pool children): nothing gets to say goodbye."""
    parent = psutil.Process(pid)
    victims = [parent, *parent.children(recursive=True)]
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    return [p.pid for p in victims]


def wait_task_state(client: Any, task_id: str, *states: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_for(
        lambda: (task := read_task(client, task_id))["state"] in states and task,
        timeout=timeout,
        interval=0.1,
        what=f"task {task_id} to be {'/'.join(states)}",
    )
