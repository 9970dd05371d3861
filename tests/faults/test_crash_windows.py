"""Crashes aimed at narrow windows: a run killed after its effect and before its outcome (the one
place at-least-once delivery can run an effect twice); a run past its soft time limit (a task that
ignores it is killed at the hard limit); the API process killed between a submit's commit and its
publish (the sync job's lost-message check dispatches the task).

The task types come from :mod:`tests.support.task_types_crash`, which these workers and this API load.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import pytest

from tests.conftest import REPO_ROOT, authorize, make_user, wait_for
from tests.faults.conftest import assert_nothing_lost, kill_pool_child, kill_worker, owner, wait_terminal
from tests.support.agent_helpers import FAST_BEATS, submit
from tests.support.schemas import private_schema
from tests.support.task_types_crash import MODULES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Workers that know the crash task types.
CRASH_ENV = {"AIOS_TASKS__MODULES": json.dumps(MODULES)}
#: Plus fast heartbeats and a short visibility timeout (as in test_worker_faults.py).
PEER_ENV = {
    **CRASH_ENV,
    **FAST_BEATS,
    "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "30",
    "AIOS_ORCHESTRATOR__TASK_TIMEOUT_S": "20",
}


@pytest.fixture(scope="module")
def crash_app(stack: Any, celery_client: Any) -> Any:
    from webapi.app import create_app

    return create_app(stack.override(tasks={"modules": MODULES}).settings, celery_client)


@pytest.fixture()
def crash_client(crash_app: Any, admin: Any) -> Any:
    """An admin client of an app that knows the crash task types."""
    return authorize(crash_app.test_client(), admin.key)


def effect_then_block(effects: Any, queue: str) -> dict[str, Any]:
    return {"type": "test.effect_then_block", "parameters": {"path": str(effects.path), "block_s": 60}, "queue": queue}


def assert_ran_twice_and_succeeded_once(tasks: dict[str, Any], effects: Any, victim: str) -> None:
    task = tasks[victim]
    assert task["state"] == "SUCCEEDED", task
    assert task["transitions"].count("SUCCEEDED") == 1, task
    assert task["attempts"] == 2, task
    # The killed run had already written its effect; the redelivered run wrote it again: twice, not more.
    assert effects.counts()[victim] == 2
    assert [attempt for t, attempt, _ in effects.starts() if t == victim] == [1, 2]


def test_a_pool_process_killed_after_its_effect_and_before_its_outcome_runs_again_and_succeeds_once(
    crash_client, start_worker, stack, effects, queue
):
    # Given a worker running a task that has written its effect and not yet returned
    worker = start_worker([queue], concurrency=1, env=CRASH_ENV)
    victim = submit(crash_client, effect_then_block(effects, queue))
    pid = effects.wait_noted(victim, suffix=".effected")

    # When its pool process is SIGKILLed in that window
    kill_pool_child(worker, pid)

    # Then the task is delivered again and ends SUCCEEDED once; its effect is recorded at most twice
    tasks = assert_nothing_lost(stack.settings.database, effects, [victim], killed_after_effect={victim})
    assert_ran_twice_and_succeeded_once(tasks, effects, victim)
    assert worker.process.poll() is None


def test_an_agent_killed_after_an_effect_and_before_its_outcome_has_the_task_run_again_by_a_peer_once(
    crash_client, start_worker, stack, effects, queue
):
    # Given two workers on one queue, one running a task that has written its effect and not returned
    workers = [start_worker([queue], concurrency=1, env=PEER_ENV) for _ in range(2)]
    victim = submit(crash_client, effect_then_block(effects, queue))
    doomed = owner(workers, effects.wait_noted(victim, suffix=".effected"))
    (peer,) = [w for w in workers if w is not doomed]

    # When that whole agent is SIGKILLed in that window
    kill_worker(doomed)

    # Then the peer runs it again and it ends SUCCEEDED once; its effect is recorded at most twice
    tasks = assert_nothing_lost(stack.settings.database, effects, [victim], killed_after_effect={victim})
    assert_ran_twice_and_succeeded_once(tasks, effects, victim)
    assert tasks[victim]["agent"] == peer.hostname


def test_a_task_that_ignores_its_soft_time_limit_is_killed_after_the_grace_and_ends_timed_out(
    crash_client, start_worker, stack, effects, queue
):
    # Given a worker, and a task with a 2 s time limit that swallows the soft limit and runs on
    timeout_s, grace_s = 2, stack.settings.orchestrator.timeout_grace_s
    worker = start_worker([queue], concurrency=1, env=CRASH_ENV)
    victim = submit(
        crash_client,
        {
            "type": "test.ignore_soft_limit",
            "queue": queue,
            "timeout_s": timeout_s,
            "parameters": {"path": str(effects.path), "run_s": 120},
        },
    )
    pid = effects.wait_started(victim)
    started = time.monotonic()

    # Then the soft limit was raised in it (and ignored) ...
    effects.wait_noted(victim, timeout=30, suffix=".soft")
    # ... and the task still ends TIMED_OUT, well before its own 120 s run would end
    tasks = wait_terminal(stack.settings.database, [victim], timeout=timeout_s + grace_s + 45)
    elapsed = time.monotonic() - started
    assert tasks[victim]["state"] == "TIMED_OUT", tasks[victim]
    assert elapsed < timeout_s + grace_s + 45
    assert tasks[victim]["attempts"] == 1
    assert tasks[victim]["transitions"] == ["PENDING", "QUEUED", "RUNNING", "TIMED_OUT"]

    # And its pool process was killed and replaced; the worker lives on
    wait_for(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
        timeout=30,
        what=f"pool process {pid} to be gone",
    )
    # (the killed one may linger a moment as a zombie until the worker reaps it: it is not the replacement)

    def replacements() -> list[int]:
        return [
            child.pid
            for child in psutil.Process(worker.process.pid).children(recursive=True)
            if child.pid != pid and child.status() != psutil.STATUS_ZOMBIE
        ]

    wait_for(replacements, timeout=30, what="a replacement pool process")
    assert worker.process.poll() is None
    assert_nothing_lost(stack.settings.database, effects, [victim])


def test_an_api_killed_between_a_submits_commit_and_its_publish_has_the_task_dispatched_by_sync_and_run_once(
    stack, start_api, start_worker, effects, queue, tmp_path
):
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import Task

    grace_s = 2
    with private_schema("crash") as url, socket.socket() as black_hole:
        # Given a ledger of its own (a sync run sees only this test's rows) and a real agent on it
        own = stack.override(database={"url": url}, orchestrator={"lost_message_grace_s": grace_s})
        own_env = {key: value for key, value in own.env.items() if stack.env.get(key) != value}
        admin = make_user(own, "admin")
        start_worker([queue], concurrency=1, env=own_env)
        # And an API whose broker accepts connections and never answers: every publish hangs
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)
        api = start_api(
            env={
                **own_env,
                "AIOS_BROKER__URL": f"redis://127.0.0.1:{black_hole.getsockname()[1]}/0",
                "AIOS_BROKER__PUBLISH_TIMEOUT_S": "30",
                "AIOS_BROKER__PUBLISH_MAX_RETRIES": "0",
                "AIOS_BROKER__SOCKET_TIMEOUT_S": "120",
            }
        )  # the window stays open until the kill

        # When a task is submitted, its row is committed and its publish hangs
        answer: dict[str, Any] = {}

        def post() -> None:
            import requests

            try:
                answer["response"] = requests.post(
                    f"{api.url}/api/v1/tasks", json=effects.task(queue), headers={"X-API-Key": admin.key}, timeout=120
                )
            except requests.RequestException as exc:
                answer["error"] = exc

        poster = threading.Thread(target=post, daemon=True)
        poster.start()

        def committed() -> list[Any]:
            with session_scope(own.settings.database) as session:
                return list(session.execute(select(Task.id, Task.state, Task.dispatch_id)).all())

        (row,) = wait_for(committed, timeout=30, interval=0.05, what="the submitted task's row")
        assert row.state == "QUEUED" and row.dispatch_id, row
        assert poster.is_alive(), f"the submit answered before the kill: {answer}"

        # And the API process is SIGKILLed in that window (the whole gunicorn process group)
        os.killpg(api.process.pid, signal.SIGKILL)
        api.process.wait(timeout=30)
        poster.join(timeout=30)
        assert "response" not in answer, f"the killed API answered: {answer['response'].status_code}"
        time.sleep(grace_s + 0.5)  # past lost_message_grace_s: the row is now a lost message

        # Then a sync run (the real `aios sync`, on the real broker) finds it lost and dispatches it again
        run = subprocess.run(
            [sys.executable, "-m", "aios.cli", "sync"],
            env={**stack.env, **own_env},
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        report = json.loads(run.stdout.strip().splitlines()[-1])
        assert report["found"]["lost_messages"] == 1 and report["changed"]["redispatched"] == 1, report

        # And the agent runs it once: nothing lost, nothing twice
        tasks = assert_nothing_lost(own.settings.database, effects, [row.id], timeout=60)
        assert tasks[row.id]["state"] == "SUCCEEDED"
        assert tasks[row.id]["attempts"] == 1
        assert tasks[row.id]["transitions"] == ["PENDING", "QUEUED", "PENDING", "QUEUED", "RUNNING", "SUCCEEDED"]
