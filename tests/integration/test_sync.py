"""The sync job (aios.recovery.sync) against real PostgreSQL, real Redis and real agent processes.

Each test runs on a PostgreSQL schema of its own (tests.support.schemas): the session schema holds
other tests' leftovers (QUEUED rows without messages, stale agents), which a sync run would rightly
find and fix, so counts there would say nothing. The outage test also has a Redis of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from tests.conftest import REPO_ROOT, Stack, authorize, make_user, wait_for
from tests.support.agent_helpers import FAST_BEATS, HEARTBEAT_TIMEOUT_S, kill_tree
from tests.support.private_redis import PrivateRedis, running_private_redis
from tests.support.schemas import private_schema

pytestmark = pytest.mark.integration

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "DEAD"}


@dataclass
class Synced:
    """One test's own ledger (and broker, if it asked): settings, env for workers, an admin API client."""

    stack: Stack
    celery: Any
    app: Any
    client: Any
    #: What a worker subprocess needs on top of the session env to use this ledger and broker.
    env: dict[str, str]

    @property
    def settings(self) -> Any:
        return self.stack.settings

    def sync(self) -> dict[str, Any]:
        from aios.recovery.sync import run_sync

        return run_sync(self.celery, self.settings, runner="test")

    def task(self, task_id: str) -> Any:
        from aios.db import session_scope
        from aios.models import Task

        with session_scope(self.settings.database) as session:
            return session.get(Task, task_id)

    def states(self, task_ids: list[str]) -> dict[str, str]:
        from aios.db import session_scope
        from aios.models import Task

        with session_scope(self.settings.database) as session:
            return dict(session.execute(select(Task.id, Task.state).where(Task.id.in_(task_ids))).all())

    def events(self, task_id: str) -> list[Any]:
        from aios.db import session_scope
        from aios.models import TaskEvent

        with session_scope(self.settings.database) as session:
            return list(session.scalars(select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)))

    def wait_state(self, task_id: str, *states: str, timeout: float = 30.0) -> Any:
        return wait_for(
            lambda: (t := self.task(task_id)) is not None and t.state in states and t,
            timeout=timeout,
            what=f"task {task_id} to reach {states}",
        )

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/api/v1/tasks", json=body)
        assert response.status_code == 202, response.json
        return response.json


def build_synced(stack: Stack, **sections: dict[str, Any]) -> Iterator[Synced]:
    from aios.broker.celery_app import create_celery_app
    from webapi.app import create_app

    own = stack.override(**sections)
    celery = create_celery_app(own.settings)
    app = create_app(own.settings, celery)
    admin = make_user(own, "admin")
    env = {key: value for key, value in own.env.items() if stack.env.get(key) != value}
    try:
        yield Synced(stack=own, celery=celery, app=app, client=authorize(app.test_client(), admin.key), env=env)
    finally:
        # kombu's connection pools are global per broker URL: close only a private broker's.
        if "url" in sections.get("broker", {}):
            celery.pool.force_close_all()


@pytest.fixture()
def synced(stack: Stack) -> Iterator[Synced]:
    """A private ledger on the session's Redis (prefix and namespace)."""
    with private_schema("sync") as url:
        yield from build_synced(stack, database={"url": url})


@pytest.fixture()
def fast_synced(stack: Stack) -> Iterator[Synced]:
    """Like ``synced``, where (as for its agents) a heartbeat is overdue after 3 s instead of 15 s."""
    with private_schema("sync") as url:
        yield from build_synced(
            stack,
            database={"url": url},
            agents={"heartbeat_interval_s": float(FAST_BEATS["AIOS_AGENTS__HEARTBEAT_INTERVAL_S"])},
        )


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    with running_private_redis(tmp_path / "redis-server.log") as server:
        yield server


def numbers(section: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in section.items() if key != "notes"}


def only_nonzero(section: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in numbers(section).items() if value}


def running_events(synced: Synced, task_id: str) -> list[Any]:
    return [e for e in synced.events(task_id) if e.to_state == "RUNNING"]


# --------------------------------------------------------------------------- nothing to fix, API, CLI


def test_a_run_with_nothing_to_fix_records_zeros_and_no_errors(synced):
    # Given a ledger with only finished work and a fresh queued task
    done = synced.submit({"type": "echo", "parameters": {}, "queue": f"q{uuid.uuid4().hex[:8]}"})
    assert done["state"] == "QUEUED"

    # When sync runs
    run = synced.sync()

    # Then it found and changed nothing, without errors, and the run is stored
    assert run["errors"] == [] and run["found"]["notes"] == []
    assert set(numbers(run["found"]).values()) == {0}, run["found"]
    assert set(run["changed"].values()) == {0}, run["changed"]
    assert run["runner"] == "test" and run["duration_s"] >= 0
    assert synced.task(done["id"]).state == "QUEUED"
    listed = synced.client.get("/api/v1/sync/runs").json["runs"]
    assert listed[0] == run


def test_sync_routes_let_viewers_read_runs_and_only_admins_run_it(synced):
    # Given two earlier runs, and a viewer and an operator
    first, second = synced.sync(), synced.sync()
    viewer = authorize(synced.app.test_client(), make_user(synced.stack, "viewer").key)
    operator = authorize(synced.app.test_client(), make_user(synced.stack, "operator").key)

    # Then a viewer (and an operator) can read them, newest first, a page at a time
    for reader in (viewer, operator):
        page = reader.get("/api/v1/sync/runs?limit=1")
        assert page.status_code == 200, page.json
        assert [r["id"] for r in page.json["runs"]] == [second["id"]]
        rest = reader.get(f"/api/v1/sync/runs?limit=5&before={page.json['next_before']}")
        assert [r["id"] for r in rest.json["runs"]] == [first["id"]] and rest.json["next_before"] is None
    # and bad parameters are a 422, not a 500
    for query in ("limit=0", "limit=abc", "limit=100000", "before=x", "colour=red"):
        bad = viewer.get(f"/api/v1/sync/runs?{query}")
        assert bad.status_code == 422, (query, bad.json)
        assert bad.json["error"] == "validation_failed"

    # But neither may run it (403), and nothing ran
    for caller in (viewer, operator):
        refused = caller.post("/api/v1/sync/run")
        assert refused.status_code == 403, refused.json
    assert synced.client.get("/api/v1/sync/runs").json["runs"][0]["id"] == second["id"]

    # When an admin runs it
    ran = synced.client.post("/api/v1/sync/run")

    # Then it ran now, answered the run, and the audit log names it
    assert ran.status_code == 200, ran.json
    assert ran.json["id"] > second["id"] and ran.json["runner"].startswith("api:") and ran.json["errors"] == []
    from aios.db import session_scope
    from aios.models import AuditEntry

    with session_scope(synced.settings.database) as session:
        actions = [
            (a.action, a.outcome)
            for a in session.scalars(select(AuditEntry).where(AuditEntry.action == "sync.run").order_by(AuditEntry.id))
        ]
    assert actions == [("sync.run", "denied"), ("sync.run", "denied"), ("sync.run", "success")]


def test_aios_sync_prints_the_run_and_exits_nonzero_only_when_a_step_failed(synced, private_redis):
    # Given the CLI pointed at this ledger, first with a working broker
    env = {**synced.stack.env, "AIOS_BROKER__URL": private_redis.url}

    def cli() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "aios.cli", "sync"],
            env=env,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = cli()
    assert ok.returncode == 0, ok.stdout + ok.stderr
    run = json.loads(ok.stdout.strip().splitlines()[-1])
    assert run["runner"] == "cli" and run["errors"] == []

    # When the broker is down
    private_redis.stop()
    failed = cli()

    # Then the run is still recorded, with the error, and the exit status says so
    assert failed.returncode == 1, failed.stdout + failed.stderr
    run = json.loads(failed.stdout.strip().splitlines()[-1])
    assert run["errors"] and run["errors"][0].startswith("broker: unreachable")


# --------------------------------------------------------------------------- broker outage


def test_100_tasks_accepted_while_redis_is_down_are_dispatched_by_the_next_sync_run_and_finish(
    stack, private_redis, start_worker, queue
):
    with private_schema("sync") as url:
        gen = build_synced(stack, database={"url": url}, broker={"url": private_redis.url})
        synced = next(gen)
        try:
            # Given an agent on the private Redis, and Redis stopped
            start_worker([queue], concurrency=2, env=synced.env)
            private_redis.stop()

            # When 100 tasks are submitted
            items = [{"type": "echo", "parameters": {"n": n}, "queue": queue} for n in range(100)]
            response = synced.client.post("/api/v1/tasks/batch", json={"tasks": items})
            assert response.status_code == 202, response.json
            ids = response.json["ids"]

            # Then all 100 are PENDING, and a sync run while Redis is down changes nothing but says why
            assert set(synced.states(ids).values()) == {"PENDING"} and len(ids) == 100
            down = synced.sync()
            assert down["errors"] and "broker: unreachable" in down["errors"][0]
            assert down["found"]["pending"] == 100 and down["changed"]["dispatched"] == 0
            assert set(synced.states(ids).values()) == {"PENDING"}

            # When Redis is back and the next sync run comes
            private_redis.start()
            run = synced.sync()

            # Then that run dispatched all 100, and they all finish, each run once
            assert run["errors"] == [], run["errors"]
            assert run["found"]["pending"] == 100 and run["changed"]["dispatched"] == 100
            wait_for(
                lambda: set(synced.states(ids).values()) == {"SUCCEEDED"},
                timeout=90,
                interval=0.5,
                what="the 100 tasks to succeed",
            )
            for n, task_id in enumerate(ids):
                task = synced.task(task_id)
                assert task.result == {"n": n} and task.attempts == 1
                assert len(running_events(synced, task_id)) == 1
            # and the next run has nothing left to do
            after = synced.sync()
            assert only_nonzero(after["found"]) == {} and after["errors"] == []
        finally:
            gen.close()


# --------------------------------------------------------------------------- lost messages


def message_key(synced: Synced, queue: str) -> tuple[Any, str]:
    """The Redis client and the one list key that holds ``queue``'s messages right now."""
    import redis

    client = redis.Redis.from_url(synced.settings.broker.url)
    base = f"{synced.settings.broker.key_prefix}{synced.settings.broker.namespace}.{queue}"
    keys = [k.decode() for k in client.scan_iter(match=f"{base}*", count=1000) if client.type(k) == b"list"]
    assert len(keys) == 1, keys
    return client, keys[0]


def test_a_queued_task_whose_message_vanished_is_redispatched_after_the_grace_and_runs_once(stack, start_worker, queue):
    grace_s = 2
    with private_schema("sync") as url:
        gen = build_synced(stack, database={"url": url}, orchestrator={"lost_message_grace_s": grace_s})
        synced = next(gen)
        try:
            # Given a QUEUED task on a queue nobody consumes yet, older than the grace period
            task = synced.submit({"type": "echo", "parameters": {"lost": True}, "queue": queue})
            old_dispatch = synced.task(task["id"]).dispatch_id
            time.sleep(grace_s + 0.5)

            # When sync runs while its message is in the queue, nothing happens to it
            run = synced.sync()
            assert run["found"]["lost_messages"] == 0 and run["changed"]["redispatched"] == 0, run
            assert synced.task(task["id"]).dispatch_id == old_dispatch

            # When its message is taken out of Redis by hand (kept, to put back later)
            client, key = message_key(synced, queue)
            original = client.rpop(key)
            assert json.loads(original)["headers"]["id"] == task["id"]
            assert client.llen(key) == 0

            # Then the next sync run finds it lost and dispatches it again under a new dispatch id
            run = synced.sync()
            assert run["errors"] == [], run["errors"]
            assert run["found"]["lost_messages"] == 1 and run["changed"]["redispatched"] == 1, run
            row = synced.task(task["id"])
            assert row.state == "QUEUED" and row.dispatch_id != old_dispatch
            moved = [e for e in synced.events(task["id"]) if e.from_state == "QUEUED" and e.to_state == "PENDING"]
            assert len(moved) == 1 and moved[0].actor == "sync"
            assert moved[0].detail["reason"] == "lost message" and moved[0].detail["dispatch_id"] == old_dispatch

            # And when the original message turns up late, beside the new one, and an agent starts
            client.lpush(key, original)
            start_worker([queue], concurrency=1, env=synced.env)

            # Then the task runs exactly once, from the new dispatch; the late original is only noted
            synced.wait_state(task["id"], "SUCCEEDED", timeout=30)
            wait_for(
                lambda: any(
                    (e.detail or {}).get("dispatch_id") == old_dispatch and e.to_state is None
                    for e in synced.events(task["id"])
                ),
                timeout=15,
                what="the stale delivery's note",
            )
            runs = running_events(synced, task["id"])
            assert len(runs) == 1 and runs[0].detail["dispatch_id"] == row.dispatch_id
            skipped = [e for e in synced.events(task["id"]) if e.to_state is None]
            assert [e.detail["note"] for e in skipped] == ["delivery skipped: stale dispatch"]
            assert synced.task(task["id"]).attempts == 1
            # and a later run leaves it alone
            assert synced.sync()["changed"]["redispatched"] == 0
        finally:
            gen.close()


# --------------------------------------------------------------------------- timeouts and lost agents


def test_a_task_running_past_its_timeout_on_a_dead_agent_is_timed_out_by_sync(synced, start_worker, queue):
    # Given a task that sleeps far longer than its timeout, RUNNING on an agent that is then killed
    worker = start_worker([queue], concurrency=1, env=synced.env)
    task = synced.submit({"type": "sleep", "parameters": {"seconds": 60}, "queue": queue, "timeout_s": 4})
    synced.wait_state(task["id"], "RUNNING", timeout=30)
    kill_tree(worker.process.pid)
    started = synced.task(task["id"]).started_at

    # When sync runs before the timeout (plus twice the grace) passed, the task is left alone
    early = synced.sync()
    assert early["found"]["overdue"] == 0 and synced.task(task["id"]).state == "RUNNING"

    # When sync runs after it (the agent's heartbeat is not even overdue yet: 15 s by default)
    from aios.recovery.timeouts import overdue_after_s

    limit_s = overdue_after_s(synced.settings, 4)
    from aios.timeutil import utcnow

    wait_for(
        lambda: started + timedelta(seconds=limit_s + 0.2) < utcnow(),
        timeout=30,
        interval=0.2,
        what="the timeout and twice the grace to pass",
    )
    run = synced.sync()

    # Then it is TIMED_OUT by sync, once
    assert run["found"]["overdue"] == 1 and run["changed"]["timed_out"] == 1, run
    assert run["changed"]["agents_offline"] == 0
    row = synced.task(task["id"])
    assert row.state == "TIMED_OUT" and row.started_at == started and "sync" in row.error
    last = synced.events(task["id"])[-1]
    assert (last.actor, last.from_state, last.to_state) == ("sync", "RUNNING", "TIMED_OUT")
    assert synced.sync()["changed"]["timed_out"] == 0


def test_a_task_running_on_an_agent_that_died_is_retried_by_sync_on_another_agent(fast_synced, start_worker, queue):
    synced = fast_synced
    # Given a task RUNNING on agent A (fast heartbeats), which is then killed outright
    worker_a = start_worker([queue], concurrency=1, env={**synced.env, **FAST_BEATS})
    task = synced.submit({"type": "sleep", "parameters": {"seconds": 3}, "queue": queue, "max_retries": 2})
    synced.wait_state(task["id"], "RUNNING", timeout=30)
    kill_tree(worker_a.process.pid)

    # When its heartbeat is overdue and sync runs (no other agent is alive to notice first)
    time.sleep(HEARTBEAT_TIMEOUT_S + 0.5)
    run = synced.sync()

    # Then sync marked the agent OFFLINE and put the task back in line for another attempt
    assert run["errors"] == [], run["errors"]
    assert run["changed"]["agents_offline"] == 1, run
    row = synced.task(task["id"])
    assert row.state == "QUEUED" and row.attempts == 1
    retried = [e for e in synced.events(task["id"]) if e.to_state == "RETRYING"]
    assert len(retried) == 1 and worker_a.hostname in retried[0].detail["reason"]

    # And agent B runs it to the end
    start_worker([queue], concurrency=1, env={**synced.env, **FAST_BEATS})
    done = synced.wait_state(task["id"], "SUCCEEDED", timeout=30)
    assert done.attempts == 2 and len(running_events(synced, task["id"])) == 2


def craft_running(synced: Synced, *, agent: str, queue: str, max_retries: int, on_agent_lost: str) -> str:
    """A task RUNNING on ``agent`` (attempt 1), moved there through the state machine, nothing published."""
    from aios.db import session_scope
    from aios.tasks.create import create_tasks
    from aios.tasks.spec import TaskSpec
    from aios.tasks.states import TaskState, transition

    spec = TaskSpec(
        type="echo",
        parameters={"agent": agent},
        priority=5,
        max_retries=max_retries,
        timeout_s=600,
        queue=queue,
        routing="queue",
        on_agent_lost=on_agent_lost,
    )
    (task_id,) = create_tasks(None, synced.settings, [spec], actor="test", publish=False).ids
    with session_scope(synced.settings.database) as session:
        dispatch_id = str(uuid.uuid4())
        assert transition(
            session, task_id, TaskState.PENDING, TaskState.QUEUED, actor="test", values={"dispatch_id": dispatch_id}
        )
        assert transition(
            session,
            task_id,
            TaskState.QUEUED,
            TaskState.RUNNING,
            actor="test",
            fence=dispatch_id,
            values={"agent": agent, "attempts": 1},
        )
        return task_id


def test_running_tasks_whose_agent_is_offline_or_unknown_are_retried_failed_or_dead_by_the_reroute_rules(
    synced, start_worker, queue
):
    from aios.db import session_scope
    from aios.models import Agent
    from aios.timeutil import utcnow

    # Given an agent that is OFFLINE in the ledger (its process is long gone) and one nobody knows
    gone, unknown = f"gone-{uuid.uuid4().hex[:6]}@nowhere", f"ghost-{uuid.uuid4().hex[:6]}@nowhere"
    with session_scope(synced.settings.database) as session:
        session.add(
            Agent(
                name=gone,
                capabilities=["echo"],
                labels={},
                weight=1,
                max_concurrency=1,
                admin_status="ACTIVE",
                status="OFFLINE",
                status_reason="test",
                active=0,
                processed=0,
                registered_at=utcnow(),
                updated_at=utcnow(),
            )
        )
    # and tasks RUNNING on them: one with retries left, one asking to fail, one out of retries
    retry = craft_running(synced, agent=gone, queue=queue, max_retries=1, on_agent_lost="retry")
    fail = craft_running(synced, agent=unknown, queue=queue, max_retries=3, on_agent_lost="fail")
    dead = craft_running(synced, agent=unknown, queue=queue, max_retries=0, on_agent_lost="retry")

    # When sync runs
    run = synced.sync()

    # Then each follows the rule, and the retried one is queued again under a new dispatch
    assert run["errors"] == [], run["errors"]
    assert run["found"]["lost_runs"] == 3
    assert only_nonzero(run["changed"]) == {"retried": 1, "failed": 1, "dead": 1}
    assert synced.states([retry, fail, dead]) == {retry: "QUEUED", fail: "FAILED", dead: "DEAD"}
    assert "was lost" in synced.task(fail).error and "no retries left" in synced.task(dead).error

    # And an agent runs the retried one; a second run changes nothing
    assert only_nonzero(synced.sync()["changed"]) == {}
    start_worker([queue], concurrency=1, env=synced.env)
    assert synced.wait_state(retry, "SUCCEEDED", timeout=30).attempts == 2


def test_a_running_task_its_live_agent_no_longer_holds_is_retried_and_one_it_still_runs_is_left_alone(
    synced, start_worker, queue
):
    from aios.db import session_scope
    from aios.models import Task
    from aios.timeutil import utcnow

    # Given a live agent really running one long task
    worker = start_worker([queue], concurrency=2, env=synced.env)
    held = synced.submit({"type": "sleep", "parameters": {"seconds": 20}, "queue": queue})
    assert synced.wait_state(held["id"], "RUNNING", timeout=30).agent == worker.hostname
    # and a task the ledger says it runs, whose run ended without a word (an orphan), out of retries or not
    orphan = craft_running(synced, agent=worker.hostname, queue=queue, max_retries=1, on_agent_lost="retry")
    last_try = craft_running(synced, agent=worker.hostname, queue=queue, max_retries=0, on_agent_lost="retry")
    # all of them started longer ago than the grace period
    long_ago = utcnow() - timedelta(seconds=synced.settings.orchestrator.lost_message_grace_s + 60)
    with session_scope(synced.settings.database) as session:
        session.execute(update(Task).where(Task.id.in_([held["id"], orphan, last_try])).values(started_at=long_ago))

    # When sync runs
    run = synced.sync()

    # Then the agent's inspect reply decides: the orphans follow the re-route rule, the held run goes on
    assert run["errors"] == [], run["errors"]
    assert run["found"]["orphaned_runs"] == 2 and run["found"]["lost_runs"] == 0, run["found"]
    assert only_nonzero(run["changed"]) == {"retried": 1, "dead": 1}
    assert synced.states([held["id"], last_try]) == {held["id"]: "RUNNING", last_try: "DEAD"}
    reasons = [e.detail["reason"] for e in synced.events(orphan) if e.to_state == "RETRYING"]
    assert reasons and "no longer runs it" in reasons[0], reasons
    # And the agent runs the orphan again under a new dispatch
    assert synced.wait_state(orphan, "SUCCEEDED", timeout=30).attempts == 2
    assert synced.states([held["id"]]) == {held["id"]: "RUNNING"}


def test_a_retry_decided_but_never_published_is_dispatched_by_the_next_run(synced, start_worker, queue):
    from aios.db import session_scope
    from aios.models import Task
    from aios.tasks.states import TaskState, transition
    from aios.timeutil import utcnow

    # Given a task a process moved to RETRYING and then died before publishing it
    task_id = craft_running(synced, agent="gone@nowhere", queue=queue, max_retries=2, on_agent_lost="retry")
    with session_scope(synced.settings.database) as session:
        assert transition(session, task_id, TaskState.RUNNING, TaskState.RETRYING, actor="test")
    stale = utcnow() - timedelta(seconds=synced.settings.orchestrator.lost_message_grace_s + 1)
    with session_scope(synced.settings.database) as session:
        session.execute(update(Task).where(Task.id == task_id).values(updated_at=stale))

    # When sync runs, Then it is queued again, and an agent runs it
    run = synced.sync()
    assert run["errors"] == [] and run["changed"]["dispatched"] == 1, run
    assert synced.states([task_id]) == {task_id: "QUEUED"}
    start_worker([queue], concurrency=1, env=synced.env)
    assert synced.wait_state(task_id, "SUCCEEDED", timeout=30).attempts == 2


# --------------------------------------------------------------------------- duplicates and late reports


def test_a_task_running_on_two_agents_is_noted_once_and_the_fenced_off_run_report_is_ignored(
    synced, start_worker, queue
):
    from aios.db import session_scope
    from aios.models import Agent
    from aios.tasks.create import dispatch
    from aios.tasks.states import TaskState, transition

    # Given two agents on one queue, and a task RUNNING on one of them
    # (slow heartbeats: nothing but this test changes what the ledger says about them)
    slow = {**synced.env, "AIOS_AGENTS__HEARTBEAT_INTERVAL_S": "60"}
    first = start_worker([queue], concurrency=1, env=slow)
    second = start_worker([queue], concurrency=1, env=slow)
    task = synced.submit({"type": "sleep", "parameters": {"seconds": 10}, "queue": queue, "max_retries": 2})
    running = synced.wait_state(task["id"], "RUNNING", timeout=30)
    holder = running.agent
    assert holder in (first.hostname, second.hostname)

    # When the ledger wrongly says its agent is OFFLINE (a partition), sync asks the agent first
    with session_scope(synced.settings.database) as session:
        session.execute(update(Agent).where(Agent.name == holder).values(status="OFFLINE"))
    run = synced.sync()

    # Then an agent that answers with the task in hand is left alone
    assert run["found"]["lost_runs"] == 0 and run["changed"]["retried"] == 0, run
    assert any("left alone" in note for note in run["found"]["notes"])
    assert synced.task(task["id"]).state == "RUNNING"

    # When the task is nevertheless dispatched again meanwhile (the other agent takes it)
    with session_scope(synced.settings.database) as session:
        assert transition(
            session, task["id"], TaskState.RUNNING, TaskState.RETRYING, actor="test", fence=running.dispatch_id
        )
    dispatch(synced.celery, synced.settings, [task["id"]], actor="test", from_state=TaskState.RETRYING)
    other = synced.wait_state(task["id"], "RUNNING", timeout=30)
    assert other.agent != holder and other.dispatch_id != running.dispatch_id

    # Then sync notes the task running on two agents, once however often it runs
    noted = synced.sync()
    assert noted["found"]["duplicates"] == 1 and noted["changed"]["duplicates_recorded"] == 1, noted
    again = synced.sync()
    assert again["found"]["duplicates"] == 1 and again["changed"]["duplicates_recorded"] == 0, again
    notes = [e for e in synced.events(task["id"]) if e.to_state is None and e.actor == "sync"]
    assert len(notes) == 1 and set(notes[0].detail["agents"]) == {holder, other.agent}

    # And the fenced-off run's report is recorded as a note and ignored; the live one decides
    done = synced.wait_state(task["id"], "SUCCEEDED", timeout=30)
    assert done.agent == other.agent and done.attempts == 2
    wait_for(
        lambda: any("late report ignored" in (e.detail or {}).get("note", "") for e in synced.events(task["id"])),
        timeout=15,
        what="the fenced-off run's late report",
    )
    late = [e for e in synced.events(task["id"]) if "late report ignored" in (e.detail or {}).get("note", "")]
    assert len(late) == 1 and late[0].detail["dispatch_id"] == running.dispatch_id
    assert synced.task(task["id"]).state == "SUCCEEDED"


# --------------------------------------------------------------------------- API keys


def test_keys_past_their_expiry_or_rotation_grace_are_marked_expired_and_audited(synced):
    from aios.db import session_scope
    from aios.models import ApiKey, AuditEntry
    from aios.security import api_keys
    from aios.timeutil import utcnow
    from tests.support.rows import user_id

    # Given a user with a key that expired, a key that expires later, and a revoked expired key
    owner = make_user(synced.stack, "operator")
    uid = user_id(synced.stack, owner.user)
    with session_scope(synced.settings.database) as session:
        past = api_keys.generate(
            session, name="past", role="operator", owner_id=uid, expires_at=utcnow() - timedelta(seconds=1)
        ).row.id
        future = api_keys.generate(
            session, name="future", role="operator", owner_id=uid, expires_at=utcnow() + timedelta(days=1)
        ).row.id
        revoked = api_keys.generate(
            session, name="revoked", role="operator", owner_id=uid, expires_at=utcnow() - timedelta(seconds=1)
        )
        revoked.row.state = api_keys.REVOKED
        revoked = revoked.row.id

    # When sync runs (twice)
    run = synced.sync()
    again = synced.sync()

    # Then only the active expired key changed, once, with an audit row
    assert run["found"]["keys_expired"] == 1 and run["changed"]["keys_expired"] == 1, run
    assert again["changed"]["keys_expired"] == 0
    with session_scope(synced.settings.database) as session:
        states = dict(
            session.execute(select(ApiKey.id, ApiKey.state).where(ApiKey.id.in_([past, future, revoked]))).all()
        )
        audits = list(session.scalars(select(AuditEntry).where(AuditEntry.action == "key.expire")))
    assert states == {past: "EXPIRED", future: "ACTIVE", revoked: "REVOKED"}
    assert [(a.principal, a.target, a.outcome) for a in audits] == [("sync", past, "success")]
