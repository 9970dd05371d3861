"""Two beats, the leader SIGKILLed (``Fault.SIGKILL_WORKER`` applied to a beat): no period fires twice.

``tests/integration/test_beat.py`` checks the firing rhythm over a minute; this is the short version
with the suite's effects ledger: every task the schedule fired runs, and records its effect, once.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid

import pytest
from sqlalchemy import select

from tests.conftest import BEAT_TEST_ENV, REPO_ROOT, wait_for
from tests.faults.conftest import assert_nothing_lost

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOCK_TTL_S = float(BEAT_TEST_ENV["AIOS_BEAT__LOCK_TTL_S"])
INTERVAL_S = 2
LOST_MESSAGE_GRACE_S = 1


def fired(stack, schedule_id: str) -> list[tuple[str, float]]:
    """``(task id, created epoch seconds)`` of every task the schedule fired, oldest first."""
    from aios.db import session_scope
    from aios.models import Task

    with session_scope(stack.settings.database) as session:
        rows = session.execute(
            select(Task.id, Task.created_at).where(Task.schedule_id == schedule_id).order_by(Task.created_at)
        ).all()
    return [(row.id, row.created_at.timestamp()) for row in rows]


def test_killing_the_leading_beat_never_doubles_a_period_and_every_fired_task_runs_once(
    client, stack, start_beat, start_worker, effects, queue
):
    # Given a worker, two beats, and a schedule every 2 s whose tasks record an effect
    start_worker([queue], concurrency=2)
    first, second = start_beat(), start_beat()
    wait_for(lambda: first.is_leader or second.is_leader, timeout=60, what="a beat leader")
    created = client.post(
        "/api/v1/schedules",
        json={
            "name": f"faults-{uuid.uuid4().hex[:6]}",
            "interval_s": INTERVAL_S,
            "task": {"type": "test.effect", "parameters": effects.params(), "queue": queue},
        },
    )
    assert created.status_code == 201, created.json
    schedule_id = created.json["id"]

    # When it fires for 10 s, the leader is SIGKILLed, and the standby runs alone for 10 s
    wait_for(lambda: len(fired(stack, schedule_id)) >= 1, timeout=30, what="the first firing")
    time.sleep(9)  # the kill lands between two slots (a kill mid-firing: test_beat_firing_kill.py)
    leader, standby = (first, second) if first.is_leader else (second, first)
    assert not standby.is_leader, "two beats lead at once"
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait()
    wait_for(lambda: standby.is_leader, timeout=LOCK_TTL_S + 10, what="the standby to take over")
    time.sleep(10)
    assert client.delete(f"/api/v1/schedules/{schedule_id}").status_code in (200, 204)

    # Then no period fired twice. A doubled slot would fire twice in one tick; the standby's catch-up of
    # the slot missed during the takeover fires late, so the next gap is short, but any two
    # consecutive gaps still span about two intervals (less the phase difference of the two beats'
    # ticks, up to tick_s); a doubled slot would make them span one
    times = fired(stack, schedule_id)
    gaps = [later[1] - earlier[1] for earlier, later in zip(times, times[1:], strict=False)]
    assert len(times) >= 6, times
    assert all(gap >= 0.5 for gap in gaps), gaps
    assert all(a + b >= 2 * INTERVAL_S - 1.5 for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    # (and at most one period was missed while the leader changed)
    assert sum(1 for gap in gaps if gap > INTERVAL_S + 1.5) <= 1, gaps

    # And after the sync job ran (what repairs a firing that a kill cut short between its commit and its
    # publish: the task waits PENDING or QUEUED without a message), every fired task ran to success and
    # recorded its effect once
    time.sleep(LOST_MESSAGE_GRACE_S + 0.5)
    result = subprocess.run(
        [sys.executable, "-m", "aios.cli", "sync"],
        cwd=str(REPO_ROOT),
        timeout=120,
        env={**stack.env, "AIOS_ORCHESTRATOR__LOST_MESSAGE_GRACE_S": str(LOST_MESSAGE_GRACE_S)},
        capture_output=True,
        text=True,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    tasks = assert_nothing_lost(stack.settings.database, effects, [task_id for task_id, _ in times], timeout=60)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
