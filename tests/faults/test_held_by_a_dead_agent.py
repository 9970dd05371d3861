"""``Fault.SIGKILL_WORKER`` between an agent's fetch and its claim, on a shared queue, with the default
(two hours) ``broker.visibility_timeout_s``.

An agent fetches a message before it claims the task (``acks_late``): kombu keeps it in its ``unacked``
hash until it is acked, and Redis hands it out again only after the visibility timeout. If the agent dies
in between, the task's row says QUEUED; a task in the dead agent's own queue is "stranded" and goes again,
but one in a shared queue waited the whole timeout. The sync job now asks the live agents what they hold
(``inspect scheduled/reserved/active``) and re-dispatches a held message none of them lists
(``aios.recovery.messages``, docs/sync.md).

The window between fetch and claim is milliseconds in a healthy system; the test holds it open by
locking the task's row in PostgreSQL, so the agent that fetched the message waits at its claim (as it
would while its database fails over). The agent is SIGKILLed there and its claim never commits (its
database session is ended with it); a peer on the same queue must then run the task, once, long before
the visibility timeout, with no sync run by hand.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import make_user, wait_for
from tests.faults.conftest import FAST_SYNC, assert_nothing_lost, kill_worker
from tests.support.agent_helpers import FAST_BEATS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_message_fetched_by_an_agent_killed_before_its_claim_is_run_once_by_a_peer_without_waiting_for_redelivery(
    private_postgres, stack, celery_client, start_api, start_worker, start_beat, effects, queue
):
    import requests
    import sqlalchemy as sa

    # Given an API and a leading beat (sync every 2 s) on a private database, the default visibility timeout
    env = {"AIOS_DATABASE__URL": private_postgres.url, **FAST_BEATS, **FAST_SYNC}
    private = stack.override(database={"url": private_postgres.url})
    assert private.settings.broker.visibility_timeout_s == 7200
    admin = make_user(private, "admin")
    api = start_api(env=env)
    beat = start_beat(env=env)
    wait_for(lambda: beat.is_leader, timeout=60, interval=0.2, what="the beat to lead")
    session = requests.Session()
    session.headers["X-API-Key"] = admin.key

    def submit(sleep_s: float) -> str:
        answer = session.post(f"{api.url}/api/v1/tasks", json=effects.task(queue, sleep_s=sleep_s), timeout=30)
        assert answer.status_code == 202, answer.text
        return answer.json()["id"]

    # And a task accepted on a shared queue before any agent consumes it, its row locked
    held = submit(0.2)
    engine = sa.create_engine(private_postgres.url)
    lock = engine.connect()
    locked = lock.begin()
    try:
        lock.execute(sa.text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": held})

        # When agent A fetches its message and waits at its claim, and agent B joins the queue
        doomed = start_worker([queue], concurrency=1, env=env)
        wait_for(
            lambda: held in _listed(celery_client, doomed.hostname),
            timeout=30,
            interval=0.2,
            what=f"agent {doomed.hostname} to hold {held} (active, not claimed)",
        )
        peer = start_worker([queue], concurrency=1, env=env)
        others = [submit(0.2) for _ in range(3)]

        # And A is SIGKILLed before its claim reached the database (the claim it sent is one autocommit
        # statement, which its server-side process would still commit once the lock goes: ended here)
        kill_worker(doomed)
        ended = lock.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))"
            )
        ).all()
        assert ended == [(True,)], ended
    finally:
        locked.rollback()
        lock.close()
        engine.dispose()

    # Then the beat's sync job finds the message held by a lost agent and dispatches it again: every task
    # succeeds once, the held one on B, long before Redis would hand the old message out again
    database = private.settings.database
    try:
        tasks = assert_nothing_lost(database, effects, [held, *others], timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- beat:\n{beat.log()[-4000:]}\n--- B:\n{peer.log()[-2000:]}") from None
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
    assert tasks[held]["agent"] == peer.hostname and tasks[held]["attempts"] == 1, tasks[held]
    assert tasks[held]["transitions"] == ["PENDING", "QUEUED", "PENDING", "QUEUED", "RUNNING", "SUCCEEDED"]
    moved = _sync_moves(database, held)
    assert [m["reason"] for m in moved] == ["held by a lost agent"], moved
    assert beat.process.poll() is None and peer.process.poll() is None


def _listed(celery: Any, hostname: str) -> set[str]:
    """Task ids agent ``hostname`` lists as active, reserved or scheduled."""
    inspect = celery.control.inspect(destination=[hostname], timeout=1.0, limit=1)
    ids: set[str] = set()
    for command in ("active", "reserved", "scheduled"):
        for item in (getattr(inspect, command)() or {}).get(hostname) or []:
            ids.add((item.get("request") or item)["id"])
    return ids


def _sync_moves(database: Any, task_id: str) -> list[dict[str, Any]]:
    """The details of the sync job's QUEUED → PENDING events of ``task_id``."""
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import TaskEvent

    with session_scope(database) as session:
        return [
            dict(event.detail or {})
            for event in session.scalars(
                select(TaskEvent).where(
                    TaskEvent.task_id == task_id,
                    TaskEvent.actor == "sync",
                    TaskEvent.from_state == "QUEUED",
                    TaskEvent.to_state == "PENDING",
                )
            )
        ]
