"""Flower's worker and queue API, the AIOS way, against real workers, Redis and PostgreSQL.

Every control call goes to a real ``aios worker`` over the broker and is checked by reading the
worker back (``stats``, ``active_queues``, ``registered``), not by trusting the reply. The queue
tests publish real messages to a queue no worker consumes and count them in Redis.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import redis
from sqlalchemy import select

from aios.broker.celery_app import queue_name
from aios.db import session_scope
from aios.models import AuditEntry, TaskEvent
from tests.conftest import REDIS_URL, authorize, make_user, wait_for

pytestmark = pytest.mark.integration

FIELDS = ("stats", "active", "reserved", "scheduled", "revoked", "registered", "active_queues", "conf")


def worker_info(client: Any, name: str, fields: str | None = None) -> dict[str, Any]:
    response = client.get(f"/api/v1/workers/{name}" + (f"?fields={fields}" if fields else ""))
    assert response.status_code == 200, response.json
    return response.json


def pool_processes(client: Any, name: str) -> list[int]:
    return worker_info(client, name, "stats")["stats"]["pool"]["processes"]


def pool_when_it_answers(client: Any, name: str) -> list[int]:
    """The worker's pool processes, or [] while it does not answer within the inspect timeout: a worker
    forking or replacing pool processes on a loaded machine may miss one 1 s reply (the API then says
    404 worker_not_found, as it should), and the wait polls again."""
    response = client.get(f"/api/v1/workers/{name}?fields=stats")
    if response.status_code == 404 and response.json["error"] == "worker_not_found":
        return []
    assert response.status_code == 200, response.json
    return response.json["stats"]["pool"]["processes"]


def consumed(client: Any, name: str) -> set[str]:
    return {q["name"] for q in worker_info(client, name, "active_queues")["active_queues"]}


def test_the_worker_list_shows_a_running_worker_with_every_inspect_field(client, start_worker, queue):
    # Given a running worker
    worker = start_worker([queue], concurrency=1)

    # When the workers are listed
    response = client.get("/api/v1/workers")

    # Then it is there, online, with every field Flower shows
    assert response.status_code == 200, response.json
    listed = {w["name"]: w for w in response.json["workers"]}
    assert worker.hostname in listed
    info = listed[worker.hostname]
    assert info["online"] is True
    for field in FIELDS:
        assert field in info and info[field] is not None, field
    assert info["stats"]["pool"]["max-concurrency"] == 1
    assert any(q["name"].endswith(f".{queue}") for q in info["active_queues"])
    assert any(entry.startswith("aios.run") for entry in info["registered"])
    assert info["active"] == [] and info["reserved"] == []
    # (and the worker's conf says what AIOS configured, without secrets in URLs)
    assert info["conf"]["task_acks_late"] is True
    assert info["conf"]["worker_pool_restarts"] is True

    # And one worker reads alone, by its name with an '@' in the path
    single = worker_info(client, worker.hostname)
    assert single["name"] == worker.hostname
    assert set(FIELDS) <= set(single)


def test_an_unknown_worker_is_404_for_reading_and_for_control(client):
    # Given no worker of that name
    name = "nobody@nowhere"

    # Then reading it and controlling it both answer 404 worker_not_found
    read = client.get(f"/api/v1/workers/{name}")
    assert read.status_code == 404, read.json
    assert read.json["error"] == "worker_not_found"
    grow = client.post(f"/api/v1/workers/{name}/pool/grow", json={"n": 1})
    assert grow.status_code == 404, grow.json
    assert grow.json["error"] == "worker_not_found"


def test_pool_restart_grow_and_shrink_change_the_workers_pool(client, start_worker, queue, stack):
    # Given a worker with one pool process
    worker = start_worker([queue], concurrency=1)
    before = pool_processes(client, worker.hostname)
    assert len(before) == 1

    # When the pool restarts
    restarted = client.post(f"/api/v1/workers/{worker.hostname}/pool/restart")

    # Then its pool process is replaced by a new one, and the worker still runs tasks
    assert restarted.status_code == 200, restarted.json
    assert restarted.json["ok"] == "reload started"
    wait_for(
        lambda: (now := pool_when_it_answers(client, worker.hostname)) and len(now) == 1 and now != before,
        timeout=30,
        what="a new pool process",
    )
    task = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {"x": 1}, "queue": queue})
    assert task.status_code == 202, task.json
    wait_for(
        lambda: client.get(f"/api/v1/tasks/{task.json['id']}").json["state"] == "SUCCEEDED",
        timeout=30,
        what="the task to succeed after the pool restart",
    )

    # When the pool grows by 2
    grown = client.post(f"/api/v1/workers/{worker.hostname}/pool/grow", json={"n": 2})

    # Then the worker says so and its stats show 3 processes
    assert grown.status_code == 200, grown.json
    assert grown.json["ok"] == "pool will grow"
    wait_for(lambda: len(pool_when_it_answers(client, worker.hostname)) == 3, timeout=20, what="3 pool processes")

    # When it shrinks by 1 (no body: n defaults to 1), its stats show 2
    shrunk = client.post(f"/api/v1/workers/{worker.hostname}/pool/shrink")
    assert shrunk.status_code == 200, shrunk.json
    wait_for(lambda: len(pool_when_it_answers(client, worker.hostname)) == 2, timeout=20, what="2 pool processes")

    # And a size outside 1-256 is refused before anything is sent
    assert client.post(f"/api/v1/workers/{worker.hostname}/pool/grow", json={"n": 0}).status_code == 422

    # And each control call is audited as worker.<action> with the worker as target
    with session_scope(stack.settings.database) as session:
        actions = Counter(session.scalars(select(AuditEntry.action).where(AuditEntry.target == worker.hostname)))
    assert actions["worker.pool_grow"] == 2 and actions["worker.pool_shrink"] == 1
    assert actions["worker.pool_restart"] == 1


def test_autoscale_is_refused_on_a_fixed_pool_and_changes_the_range_of_an_autoscaling_worker(
    client, start_worker, queue
):
    # Given a fixed-pool worker and an autoscaling one (agents.autoscale_max = 3)
    fixed = start_worker([queue], concurrency=1)
    scaling = start_worker([queue], concurrency=1, env={"AIOS_AGENTS__AUTOSCALE_MAX": "3"})
    assert worker_info(client, scaling.hostname, "stats")["stats"]["autoscaler"]["max"] == 3

    # When autoscale is asked of the fixed one, the worker refuses: 409 with its reason
    refused = client.post(f"/api/v1/workers/{fixed.hostname}/pool/autoscale", json={"max": 4, "min": 1})
    assert refused.status_code == 409, refused.json
    assert refused.json["error"] == "worker_refused"
    assert "Autoscale not enabled" in refused.json["message"]

    # When the range of the autoscaling one changes
    changed = client.post(f"/api/v1/workers/{scaling.hostname}/pool/autoscale", json={"max": 5, "min": 2})

    # Then it answers with the new range, and its stats show it
    assert changed.status_code == 200, changed.json
    assert changed.json["ok"] == "autoscale now max=5 min=2"
    autoscaler = worker_info(client, scaling.hostname, "stats")["stats"]["autoscaler"]
    assert (autoscaler["max"], autoscaler["min"]) == (5, 2)

    # And a range with min above max is refused before anything is sent
    bad = client.post(f"/api/v1/workers/{scaling.hostname}/pool/autoscale", json={"max": 1, "min": 2})
    assert bad.status_code == 422, bad.json


def test_add_and_cancel_consumer_change_the_queues_a_worker_consumes_and_it_then_runs_their_tasks(
    client, start_worker, queue, stack
):
    # Given a worker on one queue, and a task waiting on another queue nobody consumes
    worker = start_worker([queue], concurrency=1)
    extra = f"{queue}-extra"
    waiting = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {}, "queue": extra})
    assert waiting.status_code == 202 and waiting.json["state"] == "QUEUED", waiting.json
    assert queue_name(stack.settings, extra) not in consumed(client, worker.hostname)

    # When the worker is told to consume the other queue
    added = client.post(f"/api/v1/workers/{worker.hostname}/queues/add-consumer", json={"queue": extra})

    # Then its active queues include it, and the waiting task runs
    assert added.status_code == 200, added.json
    wait_for(
        lambda: queue_name(stack.settings, extra) in consumed(client, worker.hostname),
        timeout=20,
        what="the worker to consume the extra queue",
    )
    wait_for(
        lambda: client.get(f"/api/v1/tasks/{waiting.json['id']}").json["state"] == "SUCCEEDED",
        timeout=30,
        what="the task of the extra queue to run",
    )

    # When it is told to stop consuming it
    cancelled = client.post(f"/api/v1/workers/{worker.hostname}/queues/cancel-consumer", json={"queue": extra})

    # Then the queue is gone from its active queues, and the first queue is still there
    assert cancelled.status_code == 200, cancelled.json
    wait_for(
        lambda: queue_name(stack.settings, extra) not in consumed(client, worker.hostname),
        timeout=20,
        what="the worker to stop consuming the extra queue",
    )
    assert queue_name(stack.settings, queue) in consumed(client, worker.hostname)

    # And a malformed queue name is refused
    bad = client.post(f"/api/v1/workers/{worker.hostname}/queues/add-consumer", json={"queue": "no spaces"})
    assert bad.status_code == 422, bad.json


def test_rate_and_time_limits_are_set_on_the_worker_and_read_back_from_its_registered_tasks(
    client, start_worker, queue
):
    # Given a worker
    worker = start_worker([queue], concurrency=1)

    # When a rate limit and time limits are set for aios.run
    rated = client.post(f"/api/v1/workers/{worker.hostname}/rate-limit", json={"rate_limit": "10/m"})
    timed = client.post(
        f"/api/v1/workers/{worker.hostname}/time-limit", json={"task": "aios.run", "soft_s": 30, "hard_s": 40}
    )

    # Then the worker confirms both, and its registered task shows them
    assert rated.status_code == 200, rated.json
    assert rated.json["ok"] == "new rate limit set successfully"
    assert timed.status_code == 200, timed.json
    assert timed.json["ok"] == "time limits set successfully"
    (entry,) = [e for e in worker_info(client, worker.hostname, "registered")["registered"] if e.startswith("aios.run")]
    assert "rate_limit=10/m" in entry
    assert "soft_time_limit=30" in entry and "time_limit=40" in entry

    # When the rate limit is removed, the worker says so
    cleared = client.post(f"/api/v1/workers/{worker.hostname}/rate-limit", json={"rate_limit": None})
    assert cleared.status_code == 200, cleared.json
    assert cleared.json["ok"] == "rate limit disabled successfully"

    # And an unknown task is refused by the worker (409), a malformed rate before sending (422)
    unknown = client.post(
        f"/api/v1/workers/{worker.hostname}/rate-limit", json={"task": "no.such.task", "rate_limit": "1/s"}
    )
    assert unknown.status_code == 409, unknown.json
    assert "unknown task" in unknown.json["message"]
    malformed = client.post(f"/api/v1/workers/{worker.hostname}/rate-limit", json={"rate_limit": "fast"})
    assert malformed.status_code == 422, malformed.json


def test_shutdown_stops_the_worker_process(client, start_worker, queue, stack):
    # Given a running worker
    worker = start_worker([queue], concurrency=1)

    # When it is shut down over the API
    response = client.post(f"/api/v1/workers/{worker.hostname}/shutdown")

    # Then the answer is 202, the process exits with status 0 and it no longer answers
    assert response.status_code == 202, response.json
    worker.process.wait(timeout=30)
    assert worker.process.returncode == 0
    assert client.get(f"/api/v1/workers/{worker.hostname}").status_code == 404
    with session_scope(stack.settings.database) as session:
        assert session.scalars(select(AuditEntry.action).where(AuditEntry.target == worker.hostname)).all() == [
            "worker.shutdown"
        ]


def test_a_viewer_reads_workers_and_queues_but_cannot_control_or_purge_and_an_operator_cannot_purge(
    api_app, start_worker, stack, queue
):
    # Given a worker, a viewer and an operator
    worker = start_worker([queue], concurrency=1)
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    operator = authorize(api_app.test_client(), make_user(stack, "operator").key)

    # Then the viewer reads
    assert viewer.get("/api/v1/workers").status_code == 200
    assert viewer.get(f"/api/v1/workers/{worker.hostname}?fields=stats").status_code == 200
    assert viewer.get("/api/v1/queues").status_code == 200

    # But every control call is 403 for the viewer, and the worker's pool is untouched
    for path, body in [
        ("pool/grow", {"n": 1}),
        ("pool/shrink", {"n": 1}),
        ("pool/restart", None),
        ("pool/autoscale", {"max": 2, "min": 1}),
        ("queues/add-consumer", {"queue": "x"}),
        ("queues/cancel-consumer", {"queue": "x"}),
        ("rate-limit", {"rate_limit": "1/s"}),
        ("time-limit", {"soft_s": 1}),
        ("shutdown", None),
    ]:
        response = viewer.post(f"/api/v1/workers/{worker.hostname}/{path}", json=body)
        assert response.status_code == 403, (path, response.json)
    assert worker.process.poll() is None
    assert worker_info(viewer, worker.hostname, "stats")["stats"]["pool"]["max-concurrency"] == 1

    # And purge is admin only: 403 for the viewer and for the operator
    assert viewer.post(f"/api/v1/queues/{queue}/purge").status_code == 403
    assert operator.post(f"/api/v1/queues/{queue}/purge").status_code == 403
    # (the operator may control)
    assert operator.post(f"/api/v1/workers/{worker.hostname}/rate-limit", json={"rate_limit": "5/s"}).status_code == 200


def submit(client: Any, queue: str, priority: int, count: int) -> list[str]:
    response = client.post(
        "/api/v1/tasks/batch",
        json={
            "tasks": [
                {"type": "echo", "parameters": {"i": i}, "queue": queue, "priority": priority} for i in range(count)
            ]
        },
    )
    assert response.status_code == 202, response.json
    assert response.json["queued"] == count
    return response.json["ids"]


def levels(info: dict[str, Any]) -> dict[int, int]:
    return {level["priority"]: level["depth"] for level in info["levels"]}


def test_queue_depths_per_priority_and_purging_one_level_cancels_exactly_its_tasks(client, stack, ledger, queue):
    # Given 50 tasks at priority 2 and 10 at priority 8 waiting on a queue no worker consumes
    low = submit(client, queue, 2, 50)
    high = submit(client, queue, 8, 10)

    # When the queues are listed
    response = client.get("/api/v1/queues")

    # Then the queue shows 50 at level 2, 10 at level 8, nothing elsewhere, no consumers, an age
    assert response.status_code == 200, response.json
    (info,) = [q for q in response.json["queues"] if q["name"] == queue]
    assert levels(info) == {p: {2: 50, 8: 10}.get(p, 0) for p in range(10)}
    assert info["depth"] == 60 and info["queued_in_ledger"] == 60
    assert info["consumers"] == []
    assert info["broker_queue"] == queue_name(stack.settings, queue)
    assert info["oldest_age_s"] is not None and 0 <= info["oldest_age_s"] < 120
    by_level = {level["priority"]: level for level in info["levels"]}
    assert by_level[2]["oldest_published_at"] is not None and by_level[5]["oldest_published_at"] is None
    assert levels(client.get(f"/api/v1/queues/{queue}").json) == levels(info)

    # When level 2 is purged
    purged = client.post(f"/api/v1/queues/{queue}/purge", json={"priority": 2})

    # Then exactly the 50 tasks of level 2 are CANCELLED (reason "purged"), the 10 still QUEUED
    assert purged.status_code == 200, purged.json
    assert purged.json == {"queue": queue, "priority": 2, "purged": 50, "cancelled": 50, "dropped": 0, "unreadable": 0}
    assert set(ledger.states(low).values()) == {"CANCELLED"}
    assert set(ledger.states(high).values()) == {"QUEUED"}
    with session_scope(stack.settings.database) as session:
        reasons = session.scalars(
            select(TaskEvent.detail).where(TaskEvent.task_id.in_(low), TaskEvent.to_state == "CANCELLED")
        ).all()
    assert len(reasons) == 50 and all(r["reason"] == "purged" for r in reasons)

    # And the broker agrees: level 2 is empty, the 10 messages of level 8 are still in Redis
    after = client.get(f"/api/v1/queues/{queue}").json
    assert levels(after) == {p: {8: 10}.get(p, 0) for p in range(10)}
    assert after["queued_in_ledger"] == 10
    raw = redis.Redis.from_url(REDIS_URL)
    key = f"{stack.settings.broker.key_prefix}{queue_name(stack.settings, queue)}:1"  # AIOS 8 = kombu step 1
    assert raw.llen(key) == 10

    # When the rest of the queue is purged, the 10 are cancelled too and the queue is empty
    rest = client.post(f"/api/v1/queues/{queue}/purge")
    assert rest.status_code == 200, rest.json
    assert (rest.json["purged"], rest.json["cancelled"]) == (10, 10)
    assert set(ledger.states(high).values()) == {"CANCELLED"}
    assert raw.llen(key) == 0
    with session_scope(stack.settings.database) as session:
        audited = session.scalars(
            select(AuditEntry).where(AuditEntry.target == queue, AuditEntry.action == "queue.purge")
        ).all()
    assert len(audited) == 2


def test_purging_an_unknown_queue_is_404_and_a_bad_priority_is_422(client, queue):
    missing = client.post(f"/api/v1/queues/{queue}/purge", json={"priority": 2})
    assert missing.status_code == 404, missing.json
    submit(client, queue, 3, 1)
    bad = client.post(f"/api/v1/queues/{queue}/purge", json={"priority": 10})
    assert bad.status_code == 422, bad.json
    assert bad.json["field"] == "priority"
    assert client.get(f"/api/v1/queues/{queue}").json["depth"] == 1


def test_a_purged_message_of_a_task_already_cancelled_is_dropped_without_touching_the_ledger(client, ledger, queue):
    # Given two waiting tasks, one of them cancelled through the API (its message is still queued)
    first, second = submit(client, queue, 5, 2)
    assert client.delete(f"/api/v1/tasks/{first}").status_code == 200
    events_before = len(ledger.events(first))

    # When the queue is purged
    purged = client.post(f"/api/v1/queues/{queue}/purge")

    # Then both messages are gone; only the still-QUEUED task is cancelled by the purge
    assert purged.status_code == 200, purged.json
    assert (purged.json["purged"], purged.json["cancelled"], purged.json["dropped"]) == (2, 1, 1)
    assert ledger.states([first, second]) == {first: "CANCELLED", second: "CANCELLED"}
    assert len(ledger.events(first)) == events_before


def test_the_task_types_are_listed_with_their_parameter_schemas(client):
    response = client.get("/api/v1/tasks/types")
    assert response.status_code == 200, response.json
    by_name = {t["name"]: t for t in response.json["types"]}
    assert {"echo", "sleep"} <= set(by_name)
    assert "seconds" in by_name["sleep"]["parameters"]["properties"]


def test_a_viewer_sees_no_pids_broker_or_conf_of_a_worker_and_an_operator_sees_them(
    api_app, start_worker, stack, queue
):
    # Given a worker, a viewer and an operator
    worker = start_worker([queue], concurrency=1)
    viewer = authorize(api_app.test_client(), make_user(stack, "viewer").key)
    operator = authorize(api_app.test_client(), make_user(stack, "operator").key)

    # When the operator reads the worker, it sees its pids, its broker connection and its conf
    full = worker_info(operator, worker.hostname)
    assert isinstance(full["stats"]["pid"], int)
    assert full["stats"]["pool"]["processes"] and "broker" in full["stats"]
    assert full["conf"]["task_acks_late"] is True

    # Then the viewer reads the same worker without any of them, list and single alike
    listed = viewer.get("/api/v1/workers")
    assert listed.status_code == 200, listed.json
    for shown in [w for w in listed.json["workers"] if w["name"] == worker.hostname] + [
        viewer.get(f"/api/v1/workers/{worker.hostname}").json
    ]:
        assert "conf" not in shown
        assert "pid" not in shown["stats"] and "broker" not in shown["stats"]
        assert "processes" not in shown["stats"]["pool"]
        assert shown["stats"]["pool"]["max-concurrency"] == 1  # counts stay
        assert shown["active_queues"] and shown["registered"]
        assert str(full["stats"]["pid"]) not in str(shown["stats"])
    # And asking for conf is a JSON 403 that says who may see it
    refused = viewer.get(f"/api/v1/workers/{worker.hostname}?fields=stats,conf")
    assert refused.status_code == 403 and "operators and admins" in refused.json["message"], refused.json
