"""``Fault.STOP_REDIS`` with the beat running: the beat's own sync job, not a hand-run ``aios sync``,
brings every task home after the broker comes back empty.

The other outage tests run ``aios sync`` by hand once the fault is over. Here a real ``aios beat`` runs
from before the outage to the end (sync every 2 s), the broker is a private ``redis-server`` without
persistence (its queues are gone when it returns), and the test only submits and watches: whatever the
outage stranded (tasks left PENDING by failed publishes, QUEUED tasks whose messages died with Redis,
runs Celery cancelled) must be found and dispatched again by the beat.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import HttpSubmitter, assert_nothing_lost, start_system, submit_through_redis_outage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 12.0


def test_after_a_redis_outage_the_running_beat_dispatches_what_the_outage_stranded_and_every_task_finishes_once(
    private_postgres, private_redis, stack, start_api, start_worker, start_beat, effects, queue
):
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import SyncRun, Task

    # Given an API, two agents and a beat (sync every 2 s) on a private Redis (no persistence) and a
    # private PostgreSQL (so the beat's sync job sees this test's tasks only)
    system = start_system(
        stack,
        private_postgres.url,
        queue,
        start_api=start_api,
        start_worker=start_worker,
        start_beat=start_beat,
        env={"AIOS_BROKER__URL": private_redis.url},
    )
    database, workers, beat = system.database, system.workers, system.beat

    # And a stream of short tasks submitted before, during and after the outage
    submitter = HttpSubmitter(system.api.url, system.admin.key, effects, queue, interval_s=0.4)

    # When Redis stops for 12 s and comes back empty
    stopped_at = submit_through_redis_outage(submitter, private_redis, OUTAGE_S, first_runs=4)

    # Then every submission was accepted, those during the outage PENDING (their publish failed)
    assert submitter.refused == [], submitter.refused
    assert "PENDING" in submitter.states, "no submission met the outage"

    # And, with no sync run by hand, every accepted task finishes once: the beat's sync job dispatched
    # again what the outage stranded
    with session_scope(database) as session:
        stored = list(session.scalars(select(Task.id)))
    assert set(submitter.accepted) == set(stored)
    try:
        tasks = assert_nothing_lost(database, effects, stored, timeout=80)
    except AssertionError as exc:
        logs = "\n".join(f"--- {w.hostname}:\n{w.log()[-2000:]}" for w in workers)
        raise AssertionError(f"{exc}\n--- beat:\n{beat.log()[-3000:]}\n{logs}") from None
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks

    # And it was the beat: every sync run since Redis stopped is the beat's, and one of them dispatched
    # work (nothing else publishes a PENDING task; a run that began before Redis came back may be the one)
    with session_scope(database) as session:
        runs = list(
            session.execute(select(SyncRun.runner, SyncRun.changed).where(SyncRun.started_at >= _utc(stopped_at)))
        )
    assert runs and all(run.runner.startswith("beat:") for run in runs), runs
    assert any((run.changed or {}).get("dispatched") or (run.changed or {}).get("redispatched") for run in runs), runs
    assert beat.process.poll() is None and all(w.process.poll() is None for w in workers)


def _utc(epoch_s: float):  # noqa: ANN202
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC)
