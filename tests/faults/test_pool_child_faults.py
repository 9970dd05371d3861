"""Faults inside one worker: its pool process dies under a task (``Fault.SIGKILL_POOL_CHILD``), once by
an outside hand and every time by the task's own (a poison task).

The worker's main process survives both, records the lost run as a failed attempt, and keeps serving.
"""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import assert_nothing_lost, kill_pool_child
from tests.support.agent_helpers import submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_pool_process_killed_mid_task_is_redelivered_and_the_task_succeeds_once_on_its_second_attempt(
    client, start_worker, stack, effects, queue
):
    # Given a worker with two pool processes, a task that runs 3 s, and four short ones
    worker = start_worker([queue], concurrency=2)
    victim = submit(client, effects.task(queue, sleep_s=3))
    others = [submit(client, effects.task(queue, sleep_s=0.2)) for _ in range(4)]

    # When the pool process running the long task is SIGKILLed mid-run
    pid = effects.wait_started(victim)
    kill_pool_child(worker, pid)

    # Then nothing is lost: every task ends, each success recorded its effect once
    tasks = assert_nothing_lost(stack.settings.database, effects, [victim, *others])
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks

    # And the killed task was retried: it succeeded on attempt 2, in a new pool process
    task = tasks[victim]
    assert task["attempts"] == 2
    assert task["transitions"] == ["PENDING", "QUEUED", "RUNNING", "RETRYING", "QUEUED", "RUNNING", "SUCCEEDED"]
    runs = [(attempt, run_pid) for task_id, attempt, run_pid in effects.starts() if task_id == victim]
    assert [attempt for attempt, _ in runs] == [1, 2]
    assert runs[1][1] != pid
    assert all(t["attempts"] == 1 for task_id, t in tasks.items() if task_id != victim)

    # And the worker itself never stopped
    assert worker.process.poll() is None


def test_a_poison_task_that_kills_its_process_every_time_ends_dead_after_its_retries_and_does_not_loop(
    client, start_worker, stack, effects, queue
):
    # Given a worker with one pool process, and a task that SIGKILLs its own process (two retries allowed)
    worker = start_worker([queue], concurrency=1)
    poison = submit(
        client, {"type": "test.poison", "parameters": {"path": str(effects.path)}, "queue": queue, "max_retries": 2}
    )
    # And an ordinary task behind it
    after = submit(client, effects.task(queue))

    # Then the poison task ends DEAD after 1 + max_retries deliveries, and the other task still runs once
    tasks = assert_nothing_lost(stack.settings.database, effects, [poison, after])
    assert tasks[poison]["state"] == "DEAD", tasks[poison]
    assert tasks[poison]["attempts"] == 3
    assert tasks[poison]["transitions"].count("RUNNING") == 3
    assert tasks[after]["state"] == "SUCCEEDED"

    # And it does not loop: no further delivery runs it (Celery's requeued copies are skipped as stale)
    time.sleep(5)
    runs = [attempt for task_id, attempt, _ in effects.starts() if task_id == poison]
    assert runs == [1, 2, 3]
    assert read_state(stack, poison) == "DEAD"
    assert worker.process.poll() is None
    assert "worker lost" in worker.log().lower() or "WorkerLostError" in worker.log()


def read_state(stack, task_id: str) -> str:
    from tests.faults.conftest import read_tasks

    return read_tasks(stack.settings.database, [task_id])[task_id]["state"]
