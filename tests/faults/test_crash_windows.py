"""Crashes aimed at the narrow windows of a run: after its effect and before its outcome (the one
place at-least-once delivery can run an effect twice), and past its soft time limit (a task that
ignores it is killed at the hard limit).

The task types come from :mod:`tests.support.task_types_crash`, which these workers and this API load.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import authorize, wait_for
from tests.faults.conftest import assert_nothing_lost, kill_pool_child, kill_worker, wait_terminal
from tests.support.agent_helpers import FAST_BEATS, submit
from tests.support.task_types_crash import MODULES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Workers that know the crash task types.
CRASH_ENV = {"AIOS_TASKS__MODULES": json.dumps(MODULES)}
#: Plus fast heartbeats and a short visibility timeout (as in test_worker_faults.py).
PEER_ENV = {**CRASH_ENV, **FAST_BEATS, "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "30",
            "AIOS_ORCHESTRATOR__TASK_TIMEOUT_S": "20"}


@pytest.fixture(scope="module")
def crash_app(stack: Any, celery_client: Any) -> Any:
    from webapi.app import create_app

    return create_app(stack.override(tasks={"modules": MODULES}).settings, celery_client)


@pytest.fixture()
def crash_client(crash_app: Any, admin: Any) -> Any:
    """An admin client of an app that knows the crash task types."""
    return authorize(crash_app.test_client(), admin.key)


def noted(path: Path, task_id: str, attempt: int = 1, timeout: float = 60.0) -> int:
    """Wait for ``path`` (a ``<task id> <attempt> <pid>`` notes file) to name run ``attempt`` of
    ``task_id``; returns its pid."""
    def found() -> int | None:
        if not path.exists():
            return None
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        return next((int(pid) for t, a, pid in rows if t == task_id and int(a) == attempt), None)

    return int(wait_for(found, timeout=timeout, interval=0.05, what=f"{path.name} to note run {attempt} of {task_id}"))


def effect_then_block(effects: Any, queue: str) -> dict[str, Any]:
    return {"type": "test.effect_then_block", "parameters": {"path": str(effects.path), "block_s": 60},
            "queue": queue}


def owner(workers: list[Any], pid: int) -> Any:
    for worker in workers:
        if pid in {c.pid for c in psutil.Process(worker.process.pid).children(recursive=True)}:
            return worker
    raise AssertionError(f"no worker runs pid {pid}")


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
    pid = noted(Path(f"{effects.path}.effected"), victim)

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
    doomed = owner(workers, noted(Path(f"{effects.path}.effected"), victim))
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
    victim = submit(crash_client, {"type": "test.ignore_soft_limit", "queue": queue, "timeout_s": timeout_s,
                                   "parameters": {"path": str(effects.path), "run_s": 120}})
    pid = effects.wait_started(victim)
    started = time.monotonic()

    # Then the soft limit was raised in it (and ignored) ...
    noted(Path(f"{effects.path}.soft"), victim, timeout=30)
    # ... and the task still ends TIMED_OUT, well before its own 120 s run would end
    tasks = wait_terminal(stack.settings.database, [victim], timeout=timeout_s + grace_s + 45)
    elapsed = time.monotonic() - started
    assert tasks[victim]["state"] == "TIMED_OUT", tasks[victim]
    assert elapsed < timeout_s + grace_s + 45
    assert tasks[victim]["attempts"] == 1
    assert tasks[victim]["transitions"] == ["PENDING", "QUEUED", "RUNNING", "TIMED_OUT"]

    # And its pool process was killed and replaced; the worker lives on
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             timeout=30, what=f"pool process {pid} to be gone")
    children = wait_for(lambda: [c.pid for c in psutil.Process(worker.process.pid).children(recursive=True)],
                        timeout=30, what="a replacement pool process")
    assert pid not in children
    assert worker.process.poll() is None
    assert_nothing_lost(stack.settings.database, effects, [victim])
