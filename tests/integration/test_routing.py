"""Routing tasks to agents, end to end: real `aios worker` agents (heartbeat 1 s) on PostgreSQL + Redis.

Routing matches a task's type against the capabilities of the healthy agents; an agent's
capabilities are the task types it has loaded. Every worker has ``echo``; only agents started with
``tests.support.task_types_extra`` have ``test.special`` and ``test.rare``, which lets a test make
its own agents the only capable ones whatever else runs in the session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from aios.agents.registry import agent_queue, forget_healthy_cache, healthy_agents
from aios.agents.routing import capable
from aios.db import session_scope
from aios.models import AgentEvent, Task
from tests.conftest import REPO_ROOT, Credentials, Stack, WorkerProcess, authorize, make_user, wait_for
from tests.support.task_types_extra import MODULES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HEARTBEAT_S = 1.0
#: Every agent of this file beats each second (so it is OFFLINE 3 s after its last heartbeat).
AGENT_ENV = {"AIOS_AGENTS__HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S)}
#: Agents that can also run test.special and test.rare.
EXTRA_ENV = {**AGENT_ENV, "AIOS_TASKS__MODULES": json.dumps(MODULES)}


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def routing_stack(stack: Stack) -> Stack:
    """The session's settings as this file's APIs see them: heartbeat 1 s, the extra task types known,
    and rate limits that 300 submissions a minute do not reach."""
    return stack.override(
        agents={"heartbeat_interval_s": HEARTBEAT_S},
        tasks={"modules": MODULES},
        security={"rate_limit_write_per_minute": 100_000, "rate_limit_read_per_minute": 100_000},
    )


@pytest.fixture(scope="module")
def operator(stack: Stack, pg_url: str) -> Credentials:
    # An admin of its own: it may also delete agents, and no other test spends its rate budget.
    return make_user(stack, "admin")


@pytest.fixture(scope="module")
def app(routing_stack: Stack, celery_client: Any) -> Any:
    from webapi.app import create_app

    return create_app(routing_stack.settings, celery_client)


@pytest.fixture()
def api(app: Any, operator: Credentials) -> Any:
    return authorize(app.test_client(), operator.key)


def launch(
    stack: Stack, directory: Path, names: list[str], *, concurrency: int, env: dict[str, str]
) -> list[WorkerProcess]:
    """Start several real agents at once (the same command as the start_worker fixture) and wait
    until every one logged ``ready``."""
    workers = []
    for name in names:
        hostname = f"{name}@aios-test"
        log_path = directory / f"{name}.log"
        with log_path.open("wb") as handle:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aios.cli",
                    "worker",
                    "--name",
                    hostname,
                    "--queues",
                    f"q{name}",
                    "--concurrency",
                    str(concurrency),
                ],
                env={**stack.env, **env},
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=str(REPO_ROOT),
            )
        workers.append(WorkerProcess(name=name, hostname=hostname, process=process, log_path=log_path))
    for worker in workers:

        def ready(worker: WorkerProcess = worker) -> bool:
            if worker.process.poll() is not None:
                raise AssertionError(f"agent {worker.name} exited:\n{worker.log()[-3000:]}")
            return " ready." in worker.log()

        wait_for(ready, timeout=60, interval=0.2, what=f"agent {worker.name} to be ready")
    return workers


@pytest.fixture(scope="module")
def trio(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """Three agents of weight 1 and concurrency 2, shared by the tests of this module."""
    tag = uuid.uuid4().hex[:6]
    workers = launch(
        stack, tmp_path_factory.mktemp("trio"), [f"rr-{tag}-{x}" for x in "abc"], concurrency=2, env=AGENT_ENV
    )
    yield workers
    for worker in workers:
        worker.stop()


def wait_online(api: Any, workers: list[WorkerProcess]) -> None:
    for worker in workers:
        wait_for(
            lambda worker=worker: api.get(f"/api/v1/agents/{worker.hostname}").json.get("status") in ("ONLINE", "BUSY"),
            timeout=20,
            what=f"agent {worker.hostname} to be ONLINE",
        )


def routable_for(settings: Any, capability: str) -> set[str]:
    forget_healthy_cache()
    return {c.name for c in capable(healthy_agents(settings), capability)}


def wait_only_routable(settings: Any, capability: str, workers: list[WorkerProcess]) -> None:
    """Wait until exactly ``workers`` are the healthy agents for ``capability`` (agents of earlier
    tests that were killed rather than stopped drop out once their heartbeat is older than 3 s)."""
    expected = {w.hostname for w in workers}
    wait_for(
        lambda: routable_for(settings, capability) == expected,
        timeout=30,
        interval=0.2,
        what=f"exactly {sorted(expected)} to be routable for {capability}",
    )


def finished(stack: Stack, ids: list[str], *, timeout: float = 90) -> dict[str, str]:
    """Wait until every task SUCCEEDED; returns task id → the agent that ran it."""

    def done() -> bool:
        with session_scope(stack.settings.database) as session:
            states = Counter(session.scalars(select(Task.state).where(Task.id.in_(ids))))
        if set(states) - {"PENDING", "QUEUED", "RUNNING", "SUCCEEDED"}:
            pytest.fail(f"some tasks did not succeed: {dict(states)}")
        return states.get("SUCCEEDED", 0) == len(ids)

    wait_for(done, timeout=timeout, interval=0.3, what=f"{len(ids)} tasks to succeed")
    with session_scope(stack.settings.database) as session:
        rows = session.execute(select(Task.id, Task.agent, Task.queue).where(Task.id.in_(ids))).all()
    # Each task ran on the agent it was placed on: nothing was re-routed along the way
    assert all(row.queue == agent_queue(row.agent) for row in rows), [
        r for r in rows if r.queue != agent_queue(r.agent)
    ]
    return {row.id: row.agent for row in rows}


def submit(api: Any, body: dict[str, Any]) -> str:
    response = api.post("/api/v1/tasks", json=body)
    assert response.status_code == 202, response.json
    return response.json["id"]


# --------------------------------------------------------------------------- the policies


def test_weighted_round_robin_with_weights_one_two_three_gives_each_agent_its_share_of_300_tasks(
    api, routing_stack, stack, start_worker
):
    # Given three new agents of weights 1, 2 and 3 (from [agents] weight at their first registration),
    # the only ones that can run test.special
    tag = uuid.uuid4().hex[:6]
    weights = {}
    workers = []
    for weight in (1, 2, 3):
        worker = start_worker(
            [f"q{tag}"],
            name=f"wrr-{tag}-{weight}",
            concurrency=2,
            env={**EXTRA_ENV, "AIOS_AGENTS__WEIGHT": str(weight)},
        )
        workers.append(worker)
        weights[worker.hostname] = weight
    wait_online(api, workers)
    assert {w.hostname: api.get(f"/api/v1/agents/{w.hostname}").json["weight"] for w in workers} == weights
    wait_only_routable(routing_stack.settings, "test.special", workers)

    # When 300 tasks with routing weighted_round_robin are submitted, in batches of different sizes
    ids: list[str] = []
    for size in (1, 2, 5, 10, 32, 50, 100, 100):
        items = [
            {"type": "test.special", "parameters": {"n": len(ids) + i}, "routing": "weighted_round_robin"}
            for i in range(size)
        ]
        response = api.post("/api/v1/tasks/batch", json={"tasks": items})
        assert response.status_code == 202, response.json
        assert response.json["queued"] == size, response.json
        ids += response.json["ids"]

    # Then every task succeeds, and each agent ran its weight's share (within 5% of the total)
    ran = Counter(finished(stack, ids).values())
    total = sum(weights.values())
    for hostname, weight in weights.items():
        assert abs(ran[hostname] / len(ids) - weight / total) <= 0.05, (ran, weights)


def test_three_agents_each_run_a_third_of_300_tasks_submitted_one_by_one_under_the_default_round_robin(
    api, routing_stack, stack, trio
):
    # Given three agents of weight 1, the only healthy ones that can run echo
    wait_online(api, trio)
    wait_only_routable(routing_stack.settings, "echo", trio)

    # When 300 echo tasks are submitted one request at a time, naming no queue, agent or routing
    ids = [submit(api, {"type": "echo", "parameters": {"n": n}}) for n in range(300)]

    # Then every task succeeds and each agent ran 100 of them (± 1)
    agent_of = finished(stack, ids)
    ran = Counter(agent_of.values())
    assert set(ran) == {w.hostname for w in trio}
    assert all(abs(count - 100) <= 1 for count in ran.values()), ran
    # And the agents took their turns in rotation: any three consecutive tasks went to three agents
    sequence = [agent_of[task_id] for task_id in ids]
    assert all(len(set(sequence[i : i + 3])) == 3 for i in range(len(sequence) - 2)), sequence[:30]


def test_two_api_processes_submitting_alternately_share_one_rotation(
    routing_stack, stack, trio, start_api, operator, api
):
    # Given two real API processes and three agents, the only healthy ones that can run echo
    first, second = (start_api(name=name, env=routing_stack.env, wait=False) for name in ("api-a", "api-b"))
    first.wait_ready()
    second.wait_ready()
    wait_online(api, trio)
    wait_only_routable(routing_stack.settings, "echo", trio)

    # When 300 echo tasks are submitted one per request, alternating between the two APIs
    ids = []
    with requests.Session() as http:
        http.headers["X-API-Key"] = operator.key
        for n in range(300):
            target = (first, second)[n % 2]
            response = http.post(
                f"{target.url}/api/v1/tasks", json={"type": "echo", "parameters": {"n": n}}, timeout=10
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

    # Then each agent ran 100 of them (± 1): the two processes continued one shared rotation
    agent_of = finished(stack, ids)
    ran = Counter(agent_of.values())
    assert set(ran) == {w.hostname for w in trio}
    assert all(abs(count - 100) <= 1 for count in ran.values()), ran
    # And no agent got two turns in a row although consecutive turns were taken by different processes
    sequence = [agent_of[task_id] for task_id in ids]
    assert all(len(set(sequence[i : i + 3])) == 3 for i in range(len(sequence) - 2)), sequence[:30]


def test_a_task_type_only_one_agent_has_always_runs_on_that_agent(api, routing_stack, stack, trio, start_worker):
    # Given the three echo agents and one more agent, the only one that has the task type test.special
    special = start_worker(
        [f"q{uuid.uuid4().hex[:8]}"], name=f"special-{uuid.uuid4().hex[:6]}", concurrency=2, env=EXTRA_ENV
    )
    wait_online(api, [*trio, special])
    assert all("test.special" not in api.get(f"/api/v1/agents/{w.hostname}").json["capabilities"] for w in trio)
    assert "test.special" in api.get(f"/api/v1/agents/{special.hostname}").json["capabilities"]
    wait_only_routable(routing_stack.settings, "test.special", [special])

    # When 20 test.special tasks are submitted under the default routing
    ids = [submit(api, {"type": "test.special", "parameters": {"n": n}}) for n in range(20)]

    # Then all 20 ran on that agent, and it reports itself as the agent that ran them
    assert set(finished(stack, ids).values()) == {special.hostname}
    assert {api.get(f"/api/v1/tasks/{i}").json["result"]["agent"] for i in ids} == {special.hostname}


def test_a_task_no_healthy_agent_can_run_waits_pending_and_runs_within_two_heartbeats_of_a_capable_agent_starting(
    api, routing_stack, stack, start_worker
):
    # Given no healthy agent can run test.rare
    wait_for(
        lambda: not routable_for(routing_stack.settings, "test.rare"),
        timeout=30,
        what="no agent to be routable for test.rare",
    )

    # When a test.rare task is submitted
    task_id = submit(api, {"type": "test.rare", "parameters": {}})

    # Then it waits PENDING, and says why
    time.sleep(2 * HEARTBEAT_S)
    waiting = api.get(f"/api/v1/tasks/{task_id}").json
    assert (waiting["state"], waiting["pending_reason"], waiting["agent"]) == ("PENDING", "no_healthy_agent", None)

    # When an agent that can run it starts
    rare = start_worker([f"q{uuid.uuid4().hex[:8]}"], name=f"rare-{uuid.uuid4().hex[:6]}", env=EXTRA_ENV)

    # Then the task runs on it, after the agent became ONLINE (soon after: the bound is the wait's) ...
    done = wait_for(
        lambda: (body := api.get(f"/api/v1/tasks/{task_id}").json)["state"] == "SUCCEEDED" and body,
        timeout=10 * HEARTBEAT_S,
        interval=0.05,
        what="the waiting task to succeed",
    )
    assert done["agent"] == rare.hostname and done["pending_reason"] is None
    with session_scope(stack.settings.database) as session:
        online_at = session.scalar(
            select(AgentEvent.at)
            .where(AgentEvent.agent == rare.hostname, AgentEvent.to_status == "ONLINE")
            .order_by(AgentEvent.id)
            .limit(1)
        )
        task = session.get(Task, task_id)
        # ... measured in the ledger: from the agent's first ONLINE to the task's end
        assert online_at is not None
        assert timedelta(0) <= task.finished_at - online_at <= timedelta(seconds=10 * HEARTBEAT_S), (
            online_at,
            task.queued_at,
            task.finished_at,
        )


# --------------------------------------------------------------------------- pinning


def test_a_task_pinned_to_an_agent_runs_on_that_agent_and_only_there(api, routing_stack, stack, trio):
    # Given three healthy echo agents
    wait_online(api, trio)
    wait_only_routable(routing_stack.settings, "echo", trio)
    target = trio[1]

    # When ten echo tasks are pinned to the middle one, one by one and in a batch
    ids = [submit(api, {"type": "echo", "parameters": {"n": n}, "agent": target.hostname}) for n in range(5)]
    response = api.post(
        "/api/v1/tasks/batch",
        json={"tasks": [{"type": "echo", "parameters": {"n": n}, "agent": target.hostname} for n in range(5)]},
    )
    assert response.status_code == 202, response.json
    ids += response.json["ids"]

    # Then all ten ran there
    assert set(finished(stack, ids).values()) == {target.hostname}
    body = api.get(f"/api/v1/tasks/{ids[0]}").json
    assert (body["routing"], body["pinned_agent"]) == ("pinned", target.hostname)


def test_pinning_to_an_unknown_an_offline_or_an_incapable_agent_is_refused_with_409_and_stores_nothing(
    api, routing_stack, stack, trio
):
    # Given an agent that is registered but has never sent a heartbeat (OFFLINE), and a healthy one
    wait_online(api, trio)
    offline = f"pin-offline-{uuid.uuid4().hex[:8]}@aios-test"
    assert api.post("/api/v1/agents", json={"name": offline, "capabilities": ["echo"]}).status_code == 201
    assert api.get(f"/api/v1/agents/{offline}").json["status"] == "OFFLINE"
    with session_scope(stack.settings.database) as session:
        before = len(session.scalars(select(Task.id)).all())
    try:
        cases = [
            ({"type": "echo", "agent": f"nobody-{uuid.uuid4().hex[:8]}@aios-test"}, "is not a healthy agent"),
            ({"type": "echo", "agent": offline}, "is not a healthy agent"),
            ({"type": "test.special", "agent": trio[0].hostname}, "cannot run tasks of type"),
        ]
        for body, message in cases:
            # When a task is pinned to it
            response = api.post("/api/v1/tasks", json=body)
            # Then it is refused with 409 naming the agent field
            assert response.status_code == 409, response.json
            assert message in response.json["message"] and response.json["field"] == "agent"
        # And in a batch the field names the item; the whole batch is refused
        response = api.post(
            "/api/v1/tasks/batch", json={"tasks": [{"type": "echo"}, {"type": "echo", "agent": offline}]}
        )
        assert response.status_code == 409, response.json
        assert response.json["field"] == "tasks.1.agent"
        # And nothing was stored
        with session_scope(stack.settings.database) as session:
            assert len(session.scalars(select(Task.id)).all()) == before
        # And queue, agent and routing exclude each other
        response = api.post("/api/v1/tasks", json={"type": "echo", "agent": trio[0].hostname, "queue": "default"})
        assert response.status_code == 422, response.json
    finally:
        assert api.delete(f"/api/v1/agents/{offline}").status_code == 200


# --------------------------------------------------------------------------- limits and Celery's own view


def _agent_count(api: Any) -> int:
    return len(api.get("/api/v1/agents").json["agents"])


def test_registering_one_agent_more_than_max_agents_is_refused_with_409(routing_stack, celery_client, operator, api):
    from webapi.app import create_app

    # Given max_agents set to ten (or, in a long session, two more than are registered now)
    registered = _agent_count(api)
    limit = max(10, registered + 2)
    limited = authorize(
        create_app(routing_stack.override(orchestrator={"max_agents": limit}).settings, celery_client).test_client(),
        operator.key,
    )
    tag = uuid.uuid4().hex[:6]
    names = []
    try:
        # When agents are registered up to the limit
        for index in range(limit - registered):
            name = f"cap-{tag}-{index}@aios-test"
            response = limited.post("/api/v1/agents", json={"name": name, "capabilities": ["echo"]})
            assert response.status_code == 201, response.json
            names.append(name)
        assert _agent_count(api) == limit
        # Then one more is refused with 409 naming the setting, and is not stored
        response = limited.post("/api/v1/agents", json={"name": f"cap-{tag}-over@aios-test"})
        assert response.status_code == 409, response.json
        assert f"orchestrator.max_agents ({limit})" in response.json["message"]
        assert api.get(f"/api/v1/agents/cap-{tag}-over@aios-test").status_code == 404
    finally:
        # (they never sent a heartbeat, so they are OFFLINE and may be deleted)
        for name in names:
            assert api.delete(f"/api/v1/agents/{name}").status_code == 200
    # And deleting them (OFFLINE agents may be deleted) frees their places
    assert _agent_count(api) == registered


def test_concurrent_registrations_never_exceed_max_agents(routing_stack, celery_client, operator, api):
    from webapi.app import create_app

    # Given room for two more agents under max_agents
    registered = _agent_count(api)
    limit = registered + 2
    limited_app = create_app(routing_stack.override(orchestrator={"max_agents": limit}).settings, celery_client)
    tag = uuid.uuid4().hex[:6]
    names = [f"race-{tag}-{index}@aios-test" for index in range(12)]
    barrier = threading.Barrier(len(names))
    answers: dict[str, int] = {}

    def register(name: str) -> None:
        client = authorize(limited_app.test_client(), operator.key)
        barrier.wait()
        answers[name] = client.post("/api/v1/agents", json={"name": name, "capabilities": ["echo"]}).status_code

    # When twelve agents register at the same moment
    threads = [threading.Thread(target=register, args=(name,)) for name in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        # Then exactly two are registered and the other ten are refused with 409
        assert sorted(answers.values()) == [201] * 2 + [409] * 10, answers
        assert _agent_count(api) == limit
    finally:
        for name, status in answers.items():
            if status == 201:
                assert api.delete(f"/api/v1/agents/{name}").status_code == 200


def test_celery_inspect_ping_answers_pong_for_every_running_agent(stack, trio, api):
    # Given three running agents
    wait_online(api, trio)
    # When Celery's own CLI pings the workers
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "aios.broker.celery_app", "inspect", "ping", "--timeout", "5"],
        env=stack.env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then every agent answers pong under its agent name
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for worker in trio:
        line = next((line for line in output.splitlines() if worker.hostname in line), None)
        assert line is not None and "OK" in line, output
    assert output.count("pong") >= len(trio), output
