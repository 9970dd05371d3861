"""A beat SIGKILLed in the middle of a firing, then a standby beat alone brings everything home.

Firing a slot commits the schedule's ``last_slot_at`` and its task in one transaction; the tasks a
tick fired are published after the loop (:func:`aios.timing.periodic.fire_due`). The leader here is stopped
mid-loop for real: a test transaction holds one schedule's row lock, so the beat has committed the
schedules before it (tasks with no message yet) and waits on that one when it is killed. The
standby must fire each remaining slot once and never a fired one again; its own sync job (no hand-run
``aios sync``) dispatches the tasks the dead leader committed but never published.
"""

from __future__ import annotations

import signal
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import BEAT_TEST_ENV, authorize, make_user, wait_for
from tests.faults.conftest import assert_nothing_lost
from tests.support.schemas import private_schema

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCHEDULES = 12
BLOCKED_AT = 6  # the (0-based) schedule whose row the test locks: 6 fire before the kill
LOCK_TTL_S = float(BEAT_TEST_ENV["AIOS_BEAT__LOCK_TTL_S"])


def test_a_beat_killed_in_the_middle_of_a_firing_leaves_each_slot_fired_once_and_the_standby_brings_all_home(
    stack, start_beat, start_worker, effects, queue
):
    from aios.broker.celery_app import create_celery_app
    from aios.db import session_scope
    from aios.models import Schedule, Task
    from aios.timeutil import utcnow
    from webapi.app import create_app

    with private_schema("beatkill") as url:
        # Given a ledger of its own (the beats' sync runs see only this test's rows), a real agent on it,
        own = stack.override(database={"url": url}, orchestrator={"lost_message_grace_s": 1})
        own_env = {key: value for key, value in own.env.items() if stack.env.get(key) != value}
        start_worker([queue], concurrency=2, env=own_env)
        client = authorize(
            create_app(own.settings, create_celery_app(own.settings)).test_client(), make_user(own, "admin").key
        )
        # and twelve hourly schedules, all due now, fired in a known order
        ids = []
        for index in range(SCHEDULES):
            created = client.post(
                "/api/v1/schedules",
                json={
                    "name": f"kill-{index}-{uuid.uuid4().hex[:6]}",
                    "interval_s": 3600,
                    "task": {"type": "test.effect", "parameters": effects.params(), "queue": queue},
                },
            )
            assert created.status_code == 201, created.json
            ids.append(created.json["id"])
        base = utcnow() - timedelta(minutes=5)
        with session_scope(own.settings.database) as session:
            for index, schedule_id in enumerate(ids):
                session.execute(
                    sa.update(Schedule)
                    .where(Schedule.id == schedule_id)
                    .values(next_run_at=base + timedelta(seconds=index))
                )

        def fired() -> dict[str, list[str]]:
            with session_scope(own.settings.database) as session:
                rows = session.execute(sa.select(Task.schedule_id, Task.id).where(Task.schedule_id.in_(ids))).all()
            out: dict[str, list[str]] = {schedule_id: [] for schedule_id in ids}
            for row in rows:
                out[row.schedule_id].append(row.id)
            return out

        # When a test transaction holds the row lock of schedule 7 of 12
        engine = sa.create_engine(url)
        holder = engine.connect()
        try:
            lock = holder.begin()
            holder.execute(sa.select(Schedule.id).where(Schedule.id == ids[BLOCKED_AT]).with_for_update())
            # and a lone beat leads and starts the firing: it commits the first six and waits on the seventh
            env = {**own_env, "AIOS_ORCHESTRATOR__SYNC_INTERVAL_S": "2"}
            leader = start_beat(env=env)
            wait_for(
                lambda: sum(1 for tasks in fired().values() if tasks) >= BLOCKED_AT,
                timeout=60,
                what=f"the leader to fire the first {BLOCKED_AT} schedules",
            )
            wait_for(lambda: _waiting_on_lock(holder), timeout=30, what="the leader to wait on the lock")
            assert sum(1 for tasks in fired().values() if tasks) == BLOCKED_AT, fired()

            # And that beat is SIGKILLed in the middle of the firing, then the lock is let go
            leader.process.send_signal(signal.SIGKILL)
            leader.process.wait(timeout=30)
            lock.rollback()
        finally:
            holder.close()
            engine.dispose()
        mid_firing = {schedule_id: tasks[:] for schedule_id, tasks in fired().items() if tasks}
        with session_scope(own.settings.database) as session:
            left = dict(
                session.execute(
                    sa.select(Task.id, Task.state).where(
                        Task.id.in_([task for tasks in mid_firing.values() for task in tasks])
                    )
                ).all()
            )
        # (what it fired is committed and was never published: it waits PENDING for the sync job)
        assert set(left.values()) <= {"PENDING", "QUEUED"}, left

        # Then a standby beat (started now, alone) takes the lease, fires the other six slots once,
        standby = start_beat(env=env)
        wait_for(lambda: standby.is_leader, timeout=LOCK_TTL_S + 30, what="the standby to take over")
        wait_for(lambda: all(fired().values()), timeout=60, what="every schedule to have fired")

        # and its own sync job dispatches what the dead leader committed and never published: every
        # task runs once, each slot fired exactly once (none lost, none doubled)
        final = fired()
        task_ids = [task for tasks in final.values() for task in tasks]
        tasks = assert_nothing_lost(own.settings.database, effects, task_ids, timeout=60)
        assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
        assert all(len(tasks_of) == 1 for tasks_of in fired().values()), fired()
        assert {k: v for k, v in fired().items() if k in mid_firing} == mid_firing
        assert all(tasks[task_id]["attempts"] == 1 for task_id in left), tasks
        assert standby.process.poll() is None


def _waiting_on_lock(holder: sa.Connection) -> bool:
    """Whether another backend waits on a lock this connection's backend holds."""
    blocked = holder.execute(
        sa.text("SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY(pg_blocking_pids(pid))")
    ).scalar()
    return bool(blocked)
