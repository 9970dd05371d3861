"""A publish-batch chunk whose Redis flush fails part-way counts as failed whole (docs/delivery.md, Submit = outbox).

A batch submit publishes its messages through kombu's publish batch, one Redis pipeline round trip per
:data:`aios.broker.publish.PUBLISH_CHUNK` messages. The fault is a real Redis refusal, not a mock
(:attr:`tests.faults.conftest.Fault.REDIS_OUT_OF_MEMORY`): the private ``redis-server`` gets a
``maxmemory`` (``noeviction``) that it reaches in the middle of the second chunk, so the first chunk
lands whole, the second one's first messages land and the rest are refused with ``OOM``. The promise:
every task of the failed chunk goes back to ``PENDING`` (fenced), even those whose message Redis took;
once Redis is healthy, ``aios dispatch-pending`` dispatches them again under a new dispatch id, each
runs once, and a message that landed from the failed chunk is skipped by the claim fence
(``delivery skipped: stale dispatch`` on its timeline).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, authorize, make_user, wait_for
from tests.faults.conftest import assert_nothing_lost, limit_redis_memory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Two chunks: the first lands whole, the second hits the memory limit half-way.
CHUNKS = 2


def messages_in_redis(client: Any) -> dict[str, list[str]]:
    """Task id → dispatch ids of the ``aios.run`` messages waiting in any list of the (private) Redis."""
    found: dict[str, list[str]] = {}
    for key in client.scan_iter(count=1000):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            try:
                message = json.loads(raw)
                body = json.loads(base64.b64decode(message["body"]))
            except (ValueError, KeyError, TypeError):
                continue
            found.setdefault(message["headers"]["id"], []).append(body[1]["dispatch_id"])
    return found


def calibrate_chunk_bytes(celery: Any, settings: Any, client: Any, chunk: int) -> int:
    """Redis memory one chunk of ``aios.run`` messages takes: one chunk published (through the product's
    own :func:`aios.broker.publish.publish`) to a scratch queue, its list measured (``MEMORY USAGE``, the data
    alone: the connections' buffers would inflate ``used_memory``'s growth by a third), then deleted."""
    from aios.broker.publish import Dispatch, publish

    scratch = f"calibrate{uuid.uuid4().hex[:8]}"
    failures = publish(
        celery,
        settings,
        [
            Dispatch(task_id=str(uuid.uuid4()), dispatch_id=str(uuid.uuid4()), queue=scratch, priority=5, timeout_s=300)
            for _ in range(chunk)
        ],
    )
    assert not failures, failures
    lists = [key for key in client.scan_iter(match=f"*{scratch}*") if client.type(key) == b"list"]
    assert [client.llen(key) for key in lists] == [chunk], lists
    size = int(client.memory_usage(lists[0], samples=0))
    client.delete(*lists)
    return size


def test_a_chunk_whose_redis_flush_fails_part_way_goes_back_pending_whole_and_each_task_then_runs_once(
    private_redis, private_postgres, stack, start_worker, effects, queue
):
    import redis

    from aios.broker.celery_app import create_celery_app
    from aios.broker.publish import PUBLISH_CHUNK
    from aios.db import session_scope
    from aios.models import Task, TaskEvent
    from webapi.app import create_app

    # Given an API on a private Redis and a private PostgreSQL, and no agent running yet
    private = stack.override(database={"url": private_postgres.url}, broker={"url": private_redis.url})
    admin = make_user(private, "admin")
    celery = create_celery_app(private.settings)
    api = authorize(create_app(private.settings, celery).test_client(), admin.key)
    client = redis.Redis.from_url(private_redis.url)

    # And a Redis that refuses writes (noeviction) once it holds about one and a half chunks of messages
    chunk_bytes = calibrate_chunk_bytes(celery, private.settings, client, PUBLISH_CHUNK)
    limit_redis_memory(client, chunk_bytes * 3 // 2)

    # When a batch of two chunks is submitted
    count = CHUNKS * PUBLISH_CHUNK
    response = api.post("/api/v1/tasks/batch", json={"tasks": [effects.task(queue) for _ in range(count)]})

    # Then it is accepted whole: the first chunk QUEUED, the second PENDING (its flush failed)
    assert response.status_code == 202, response.json
    assert (response.json["queued"], response.json["pending"]) == (PUBLISH_CHUNK, PUBLISH_CHUNK), response.json
    ids = response.json["ids"]
    landed_chunk, failed_chunk = ids[:PUBLISH_CHUNK], ids[PUBLISH_CHUNK:]
    with session_scope(private.settings.database) as session:
        rows = {
            row.id: row
            for row in session.query(Task.id, Task.state, Task.dispatch_id, Task.pending_reason).filter(
                Task.id.in_(ids)
            )
        }
        rolled_back = {
            event.task_id: event
            for event in session.query(TaskEvent).filter(
                TaskEvent.task_id.in_(failed_chunk), TaskEvent.from_state == "QUEUED", TaskEvent.to_state == "PENDING"
            )
        }
    assert {rows[t].state for t in landed_chunk} == {"QUEUED"}
    assert {(rows[t].state, rows[t].pending_reason) for t in failed_chunk} == {("PENDING", "publish_failed")}
    assert set(rolled_back) == set(failed_chunk)
    assert {e.detail["reason"] for e in rolled_back.values()} == {"publish failed"}
    assert "BatchPublishError" in next(iter(rolled_back.values())).detail["error"]

    # And Redis really took part of the failed chunk: every message of the first chunk and the first
    # messages of the second landed, the rest were refused (OOM)
    in_redis = messages_in_redis(client)
    assert all(in_redis.get(t) == [rows[t].dispatch_id] for t in landed_chunk)
    landed_of_failed = [t for t in failed_chunk if t in in_redis]
    assert 0 < len(landed_of_failed) < PUBLISH_CHUNK, f"{len(landed_of_failed)} of the failed chunk landed"
    assert landed_of_failed == failed_chunk[: len(landed_of_failed)], "Redis took a prefix of the pipeline"
    stale = {t: in_redis[t] for t in landed_of_failed}
    assert all(stale[t] == [rows[t].dispatch_id] for t in landed_of_failed)
    # (Redis answered OOM to each message of the failed chunk it did not take)
    assert client.info("errorstats")["errorstat_OOM"]["count"] == PUBLISH_CHUNK - len(landed_of_failed)

    # When Redis is healthy again and `aios dispatch-pending` runs
    limit_redis_memory(client, 0)
    result = subprocess.run(
        [sys.executable, "-m", "aios.cli", "dispatch-pending"],
        env=private.env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"queued": PUBLISH_CHUNK, "still_pending": 0}

    # Then the failed chunk is QUEUED again under new dispatch ids, so its landed messages are stale
    with session_scope(private.settings.database) as session:
        now = dict(session.query(Task.id, Task.dispatch_id).filter(Task.id.in_(failed_chunk)))
    assert all(now[t] not in stale[t] for t in landed_of_failed)

    # And once an agent runs, every task runs exactly once: one SUCCEEDED event and one effect each
    worker = start_worker(
        [queue], concurrency=2, env={"AIOS_BROKER__URL": private_redis.url, "AIOS_DATABASE__URL": private_postgres.url}
    )
    try:
        tasks = assert_nothing_lost(private.settings.database, effects, ids, timeout=120)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.log()[-3000:]}") from None
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}
    assert {t["attempts"] for t in tasks.values()} == {1}

    # And each message that landed from the failed chunk was skipped by the claim fence (a stale
    # message may still be on its way when its task has finished: wait for the notes)
    def skipped() -> dict[str, str]:
        with session_scope(private.settings.database) as session:
            return {
                e.task_id: e.detail["dispatch_id"]
                for e in session.query(TaskEvent).filter(
                    TaskEvent.task_id.in_(landed_of_failed), TaskEvent.to_state.is_(None)
                )
                if e.detail.get("note") == "delivery skipped: stale dispatch"
            }

    expected = {t: stale[t][0] for t in landed_of_failed}
    wait_for(
        lambda: skipped() == expected,
        timeout=60,
        interval=0.5,
        what=f"the {len(expected)} stale message(s) of the failed chunk to be skipped",
    )
    assert messages_in_redis(client) == {}
    assert effects.counts() == {t: 1 for t in ids}
    celery.pool.force_close_all()
    client.close()
