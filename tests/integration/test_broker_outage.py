"""A broker outage: the API keeps accepting work, and nothing it accepted is lost.

The shared Redis on 6379 serves other tests, so each test here runs its own ``redis-server`` on a
free port and stops and restarts that one. The API app, the worker and ``aios dispatch-pending``
are all pointed at the private Redis; the database is the session's PostgreSQL schema.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, Stack, authorize, wait_for
from tests.support.private_redis import PrivateRedis, running_private_redis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: What the acceptance criterion allows a submit to take while the broker is down.
SUBMIT_BUDGET_S = 5.0
#: How long a worker may take to find the restarted Redis by itself and run the backlog.
RECOVERY_TIMEOUT_S = 60.0


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A running private Redis, always killed at teardown (after the test's workers stopped)."""
    with running_private_redis(tmp_path / "redis-server.log") as server:
        yield server


@pytest.fixture()
def outage(
    private_redis: PrivateRedis, stack: Stack, start_worker: Any, ledger: Any, queue: str, admin: Any
) -> Iterator[Any]:
    """An API app and a worker on ``queue``, both using the private Redis as their broker.

    Requests ``private_redis`` before ``start_worker`` so the worker is stopped before Redis is killed.
    """
    from aios.broker.celery_app import create_celery_app
    from webapi.app import create_app

    private = stack.override(broker={"url": private_redis.url})
    celery = create_celery_app(private.settings)
    app = create_app(private.settings, celery)
    worker = start_worker([queue], concurrency=2, env={"AIOS_BROKER__URL": private_redis.url})

    class Outage:
        redis = private_redis
        client = authorize(app.test_client(), admin.key)
        env = private.env
        worker_log = staticmethod(worker.log)

        def dispatch_pending(self) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "aios.cli", "dispatch-pending"],
                env=self.env,
                cwd=str(REPO_ROOT),
                capture_output=True,
                text=True,
                timeout=60,
            )

        def wait_all_succeeded(self, task_ids: list[str], *, what: str) -> None:
            try:
                wait_for(
                    lambda: set(ledger.states(task_ids).values()) == {"SUCCEEDED"},
                    timeout=RECOVERY_TIMEOUT_S,
                    interval=0.5,
                    what=f"{what} to succeed",
                )
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}; states {ledger.states(task_ids)}; worker log:\n{worker.log()[-3000:]}"
                ) from None

    yield Outage()
    celery.pool.force_close_all()


def timed_post(client: Any, url: str, body: dict[str, Any]) -> tuple[Any, float]:
    began = time.monotonic()
    response = client.post(url, json=body)
    return response, time.monotonic() - began


def assert_published(result: subprocess.CompletedProcess[str], ledger: Any, ours: list[str]) -> dict[str, Any]:
    """``aios dispatch-pending`` published every task of ``ours``; returns its summary.

    It dispatches every PENDING task of the session's shared ledger, where another test file running
    beside this one may have a task waiting for an agent it stopped (exit 1, ``still_pending``): that
    is theirs to wait for, not a failure here. None of ours may be left PENDING."""
    assert result.returncode in (0, 1), result.stdout + result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "PENDING" not in set(ledger.states(ours).values()), (summary, ledger.states(ours))
    if result.returncode == 1:
        assert summary["still_pending"] > 0, summary
    return dict(summary)


def last_event(ledger: Any, task_id: str) -> Any:
    return ledger.events(task_id)[-1]


def test_while_redis_is_down_a_submit_answers_202_pending_fast_and_dispatch_pending_runs_it_once_redis_is_back(
    outage, ledger, queue
):
    # Given the API and a worker on a private Redis, and a task that ran before the outage
    before = outage.client.post(
        "/api/v1/tasks", json={"type": "echo", "parameters": {"phase": "before"}, "queue": queue}
    )
    assert before.status_code == 202 and before.json["state"] == "QUEUED", before.json
    ledger.wait_state(before.json["id"], "SUCCEEDED", timeout=30)

    # When Redis stops
    outage.redis.stop()

    # Then every submit still answers 202 PENDING within the budget, and is stored PENDING
    accepted: list[str] = []
    for n in range(4):
        response, took = timed_post(
            outage.client, "/api/v1/tasks", {"type": "echo", "parameters": {"n": n}, "queue": queue}
        )
        assert response.status_code == 202, response.json
        assert response.json["state"] == "PENDING"
        assert took < SUBMIT_BUDGET_S, f"submit {n} took {took:.2f}s with the broker down"
        accepted.append(response.json["id"])
    assert set(ledger.states(accepted).values()) == {"PENDING"}
    # (each one was queued, its publish failed, and it went back to PENDING with the reason)
    for task_id in accepted:
        event = last_event(ledger, task_id)
        assert (event.from_state, event.to_state) == ("QUEUED", "PENDING")
        assert event.detail["reason"] == "publish failed"

    # And readiness says so, as JSON
    ready = outage.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.is_json
    assert ready.json["status"] == "not_ready"
    assert ready.json["checks"]["broker"]["ok"] is False
    assert ready.json["checks"]["database"]["ok"] is True

    # When Redis is back and `aios dispatch-pending` runs
    outage.redis.start()
    result = outage.dispatch_pending()

    # Then it published every task accepted during the outage
    summary = assert_published(result, ledger, accepted)
    assert summary["queued"] >= len(accepted)

    # And the worker, reconnected by itself, runs every accepted task exactly once
    outage.wait_all_succeeded(accepted, what="the tasks accepted during the outage")
    log = outage.worker_log()
    assert "Connection to broker lost" in log
    assert log.count("Connected to redis://") >= 2, "the worker did not reconnect to the restarted Redis"
    for n, task_id in enumerate(accepted):
        task = ledger.task(task_id)
        assert task.result == {"n": n}
        assert task.attempts == 1
        assert [e.to_state for e in ledger.events(task_id) if e.to_state == "RUNNING"] == ["RUNNING"]

    # And the API publishes again: readiness is back and a new submit is queued and runs
    assert outage.client.get("/readyz").status_code == 200
    after = outage.client.post("/api/v1/tasks", json={"type": "echo", "parameters": {"phase": "after"}, "queue": queue})
    assert after.status_code == 202 and after.json["state"] == "QUEUED", after.json
    assert ledger.wait_state(after.json["id"], "SUCCEEDED", timeout=30).result == {"phase": "after"}


def test_while_redis_is_down_a_batch_is_accepted_all_pending_and_runs_after_dispatch_pending(outage, ledger, queue):
    # Given the API and a worker on a private Redis, and Redis stopped
    outage.redis.stop()

    # When a batch of 20 tasks is submitted
    items = [{"type": "echo", "parameters": {"n": n}, "queue": queue} for n in range(20)]
    response, took = timed_post(outage.client, "/api/v1/tasks/batch", {"tasks": items})

    # Then it answers 202 within the budget with every task stored PENDING
    assert response.status_code == 202, response.json
    assert took < SUBMIT_BUDGET_S, f"batch submit took {took:.2f}s with the broker down"
    assert response.json["count"] == 20
    assert response.json["pending"] == 20 and response.json["queued"] == 0
    ids = response.json["ids"]
    assert set(ledger.states(ids).values()) == {"PENDING"}
    assert len(ledger.states(ids)) == 20

    # When Redis is back and `aios dispatch-pending` runs
    outage.redis.start()
    result = outage.dispatch_pending()
    assert_published(result, ledger, ids)

    # Then every task of the batch runs to SUCCEEDED, each exactly once
    outage.wait_all_succeeded(ids, what="the batch accepted during the outage")
    for n, task_id in enumerate(ids):
        task = ledger.task(task_id)
        assert task.result == {"n": n}
        assert task.attempts == 1
