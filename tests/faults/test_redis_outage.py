"""``Fault.STOP_REDIS``: the broker goes away for 20 s while tasks are being submitted and run.

Everything runs on a private ``redis-server`` without persistence (the harsh case: its queues are gone
when it returns). The API keeps accepting (tasks wait PENDING), the workers reconnect by themselves, and
the sync job (``aios sync``, as the beat would run it) re-publishes what the outage lost.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, authorize, wait_for
from tests.faults.conftest import (
    Submitter,
    assert_nothing_lost,
    read_tasks,
    submit_through_redis_outage,
    wait_terminal,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 20.0
#: A QUEUED task whose message is in no queue and no agent's hands is re-published after this.
LOST_MESSAGE_GRACE_S = 2
#: Longest a worker may take to reconnect once Redis is back: Celery's reconnect backoff grows by 2 s a
#: try, so after a 20 s outage the next try can be 12 s away; a generous bound on a loaded machine.
RECONNECT_WAIT_S = 60


class ClientSubmitter(Submitter):
    """A :class:`Submitter` of unguarded tasks through the app's test client."""

    def __init__(self, client: Any, effects: Any, queue: str, interval_s: float = 0.4) -> None:
        super().__init__(effects, queue, interval_s, alternate_guard=False)
        self.client = client

    def post(self, body: dict[str, Any]) -> tuple[int | str, Any]:
        response = self.client.post("/api/v1/tasks", json=body)
        return response.status_code, response.json


def test_every_task_accepted_around_a_20s_redis_outage_finishes_once_and_workers_resume_without_a_restart(
    private_redis, stack, admin, start_worker, effects, queue
):
    from aios.broker.celery_app import create_celery_app
    from webapi.app import create_app

    # Given an API and two workers whose broker is a private Redis
    private = stack.override(
        broker={"url": private_redis.url}, orchestrator={"lost_message_grace_s": LOST_MESSAGE_GRACE_S}
    )
    celery = create_celery_app(private.settings)
    client = authorize(create_app(private.settings, celery).test_client(), admin.key)
    workers = [start_worker([queue], concurrency=2, env={"AIOS_BROKER__URL": private_redis.url}) for _ in range(2)]
    pids = [w.process.pid for w in workers]

    # And a stream of submissions, about two and a half a second, running as they come
    submitter = ClientSubmitter(client, effects, queue)

    # When Redis stops for 20 s while the stream goes on, and for a few more seconds after it is back
    submit_through_redis_outage(submitter, private_redis, OUTAGE_S, first_runs=3)

    # Then every submission was accepted (202), some of them PENDING during the outage
    assert submitter.refused == [], submitter.refused
    assert "PENDING" in submitter.states, "no submission met the outage"
    accepted = submitter.accepted

    # And the sync job, run as the beat would, gets every accepted task to finish after Redis returned
    last: dict[str, str] = {}

    def synced_and_finished() -> bool:
        result = subprocess.run(
            [sys.executable, "-m", "aios.cli", "sync"],
            env=private.env,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode in (0, 1), result.stdout + result.stderr
        last["sync"] = result.stdout[-2000:]
        try:
            wait_terminal(private.settings.database, accepted, timeout=5)
            return True
        except AssertionError as exc:
            last["stuck"] = str(exc)[-3000:]
            return False

    try:
        wait_for(
            synced_and_finished,
            timeout=120,
            interval=LOST_MESSAGE_GRACE_S,
            what="every accepted task to finish after sync runs",
        )
    except AssertionError as exc:
        # What a flaky run needs to be understood: the stuck tasks, the last sync run, the workers' logs.
        logs = "\n".join(f"--- worker {w.hostname} (exit {w.process.poll()}):\n{w.log()[-3000:]}" for w in workers)
        raise AssertionError(f"{exc}\n{last.get('stuck', '')}\nlast sync: {last.get('sync', '')}\n{logs}") from None
    tasks = assert_nothing_lost(private.settings.database, effects, accepted, timeout=10)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, {
        k: v for k, v in tasks.items() if v["state"] != "SUCCEEDED"
    }

    # And the workers resumed by themselves: the same processes, reconnected to the restarted Redis
    # (a worker that had nothing to do may still be in Celery's reconnect backoff, 2 s more per try, when
    # the other one has run every task: give it the longest step of that backoff)
    for worker, pid in zip(workers, pids, strict=True):
        assert worker.process.poll() is None and worker.process.pid == pid
        try:
            wait_for(
                lambda w=worker: w.log().count("Connected to redis://") >= 2,
                timeout=RECONNECT_WAIT_S,
                interval=0.5,
                what=f"worker {worker.hostname} to reconnect",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{worker.log()[-3000:]}") from None
    began = time.monotonic()
    last = client.post("/api/v1/tasks", json=effects.task(queue))
    assert last.status_code == 202 and last.json["state"] == "QUEUED", last.json
    wait_terminal(private.settings.database, [last.json["id"]], timeout=60)
    assert time.monotonic() - began < 60
    assert not any("Unrecoverable error" in w.log() for w in workers)
    celery.pool.force_close_all()


def test_a_run_celery_cancels_when_redis_goes_away_is_settled_at_once_and_runs_again_once_it_returns(
    private_redis, stack, admin, start_worker, effects, queue
):
    from aios.db import session_scope
    from aios.models import Task
    from webapi.app import create_app

    # Given an agent on a private Redis (no persistence) running a long task
    private = stack.override(
        broker={"url": private_redis.url}, orchestrator={"lost_message_grace_s": LOST_MESSAGE_GRACE_S}
    )
    client = authorize(create_app(private.settings).test_client(), admin.key)
    worker = start_worker([queue], concurrency=1, env={"AIOS_BROKER__URL": private_redis.url})
    accepted = client.post("/api/v1/tasks", json=effects.task(queue, sleep_s=60, params={"retry_sleep_s": 0}))
    assert accepted.status_code == 202, accepted.json
    task_id = accepted.json["id"]
    effects.wait_started(task_id)

    # When Redis goes away (its queues with it): Celery cancels the run and leaves its message unacked
    private_redis.stop()

    # Then the agent settles the run in the ledger at once, instead of leaving it RUNNING for an hour
    def parked() -> Any:
        with session_scope(private.settings.database) as session:
            row = session.get(Task, task_id)
            return row.state == "PENDING" and row.pending_reason == "connection_lost" and row

    try:
        wait_for(parked, timeout=30, what="the cancelled run to be put back PENDING (connection_lost)")
    except AssertionError as exc:
        transitions = read_tasks(private.settings.database, [task_id])[task_id]["transitions"]
        raise AssertionError(f"{exc}: {transitions}\n{worker.log()[-5000:]}") from None

    # And once Redis is back, the next sync run dispatches it and it runs to the end, its effect once
    private_redis.start()

    def synced() -> bool:
        result = subprocess.run(
            [sys.executable, "-m", "aios.cli", "sync"],
            env=private.env,
            cwd=str(REPO_ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode in (0, 1), result.stdout + result.stderr
        return read_tasks(private.settings.database, [task_id])[task_id]["state"] in ("QUEUED", "RUNNING", "SUCCEEDED")

    wait_for(synced, timeout=60, interval=1, what="a sync run to dispatch the task again")
    tasks = assert_nothing_lost(private.settings.database, effects, [task_id], timeout=60)
    assert tasks[task_id]["state"] == "SUCCEEDED" and tasks[task_id]["attempts"] == 2, tasks
    assert tasks[task_id]["transitions"] == [
        "PENDING",
        "QUEUED",
        "RUNNING",
        "RETRYING",
        "PENDING",
        "QUEUED",
        "RUNNING",
        "SUCCEEDED",
    ], tasks
    assert worker.process.poll() is None
