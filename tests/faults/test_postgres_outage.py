"""``Fault.STOP_POSTGRES``: the database stops for 10 s while workers are recording results.

The shared PostgreSQL is never stopped: this test runs on a private cluster of its own
(:class:`tests.faults.conftest.PrivatePostgres`), with the API and the workers pointed at it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, authorize, make_user
from tests.faults.conftest import assert_nothing_lost, read_tasks
from tests.support.agent_helpers import submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 10.0


def test_a_10s_postgres_outage_answers_503_meanwhile_and_every_task_finishes_once_when_it_returns(
    private_postgres, stack, start_worker, effects, queue
):
    from aios.broker.celery_app import create_celery_app
    from webapi.app import create_app

    # Given an API and a worker (three pool processes) whose database is a private PostgreSQL
    private = stack.override(database={"url": private_postgres.url})
    admin = make_user(private, "admin")
    celery = create_celery_app(private.settings)
    client = authorize(create_app(private.settings, celery).test_client(), admin.key)
    worker = start_worker([queue], concurrency=3, env={"AIOS_DATABASE__URL": private_postgres.url})

    # And six 3 s tasks: three running, three waiting for a pool process
    task_ids = [submit(client, effects.task(queue, sleep_s=3)) for _ in range(6)]
    for task_id in task_ids[:3]:
        effects.wait_started(task_id)

    # When PostgreSQL stops for 10 s while they finish and record their results
    private_postgres.stop()
    stopped_at = time.monotonic()
    try:
        # Then the API answers 503 with a JSON error (not 500) for reads and for submits
        read = client.get(f"/api/v1/tasks/{task_ids[0]}")
        assert read.status_code == 503, (read.status_code, read.get_data(as_text=True)[:500])
        assert read.json["error"] == "database_unavailable"
        posted = client.post("/api/v1/tasks", json=effects.task(queue))
        assert posted.status_code == 503, (posted.status_code, posted.get_data(as_text=True)[:500])
        assert posted.is_json and posted.headers.get("Retry-After")
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))
    finally:
        private_postgres.start()

    # And the API answers again
    assert client.get(f"/api/v1/tasks/{task_ids[0]}").status_code == 200

    # And after the next sync run, nothing is stuck RUNNING: every task finished, each effect once
    result = subprocess.run(
        [sys.executable, "-m", "aios.cli", "sync"],
        env=private.env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])
    tasks = assert_nothing_lost(private.settings.database, effects, task_ids, timeout=90)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
    assert all(t["attempts"] == 1 for t in tasks.values()), tasks
    assert "RUNNING" not in {t["state"] for t in read_tasks(private.settings.database, task_ids).values()}

    # And the worker retried its writes by itself, without a restart
    assert worker.process.poll() is None
    assert "database unavailable while" in worker.log()
    # (no celery.pool.force_close_all() here: this app's broker is the shared Redis, whose kombu pool
    # is global per URL and shared with the session's app)
