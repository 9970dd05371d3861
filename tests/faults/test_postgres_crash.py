"""``Fault.CRASH_POSTGRES`` / ``Fault.SIGKILL_POSTGRES``: the database crashes while claims and outcomes
are in flight, and comes back through crash recovery.

docs/delivery.md promises: a claim commits without waiting for its WAL flush, so a crash can lose a claim
whose run has not recorded its outcome yet; the task is then QUEUED again under the same dispatch, the
run's report is noted as a late report, and the sync job dispatches it again (at least once). The
outcome waits for its flush, so a recorded outcome survives the crash, and it is recorded once.

Everything runs as in production: a private cluster with ``fsync`` on, a real ``aios api`` (gunicorn), two
real agents, and a real ``aios beat`` whose sync job (every 2 s) is the only thing that repairs the ledger
after the crash: the test never runs ``aios sync``. Half the tasks guard their effect (they check, on a
definite answer from the database, that their run still holds the task before acting); the other half
act without checking, the case where at-least-once shows.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import wait_for
from tests.faults.conftest import Fault, HttpSubmitter, assert_nothing_lost, settle, start_system

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: How long the database stays down before it is started again (crash recovery follows).
DOWN_S = 3.0


def crash(server: Any, fault: Fault) -> None:
    if fault is Fault.CRASH_POSTGRES:
        server.crash()
    else:
        server.kill_postmaster()


@pytest.mark.parametrize("fault", [Fault.CRASH_POSTGRES, Fault.SIGKILL_POSTGRES], ids=["immediate", "sigkill"])
def test_a_postgres_crash_with_claims_and_outcomes_in_flight_loses_no_accepted_task_and_records_each_outcome_once(
    fault, durable_postgres, stack, start_api, start_worker, start_beat, effects, queue
):
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import SyncRun, Task

    # Given an API, two agents (two pool processes each) and a beat on a private PostgreSQL with fsync on
    system = start_system(
        stack, durable_postgres.url, queue, start_api=start_api, start_worker=start_worker, start_beat=start_beat
    )
    database = system.database

    # And a steady stream of short tasks (0.3 s), about four a second, running as they come
    submitter = HttpSubmitter(system.api.url, system.admin.key, effects, queue)
    submitter.start()
    try:
        wait_for(lambda: len(effects.counts()) >= 8, timeout=60, what="the first tasks to run")

        # When PostgreSQL crashes while runs are claiming and recording (no clean shutdown, no checkpoint)
        crash(durable_postgres, fault)
        settle(DOWN_S)
        # And comes back through crash recovery, the stream going on all the while and after
        durable_postgres.start()
        restarted_at = time.time()
        settle(4)
    finally:
        submitter.stop()
    accepted = submitter.accepted
    assert len(accepted) >= 10, (accepted, submitter.refused)
    assert set(submitter.refused) <= {503, "ConnectionError", "ReadTimeout"}, submitter.refused

    # Then every task answered 202 survived the crash (the submit's commit waits for its flush) ...
    with session_scope(database) as session:
        parameters = {row.id: row.parameters for row in session.execute(select(Task.id, Task.parameters))}
    stored = list(parameters)
    missing = set(accepted) - set(stored)
    assert not missing, f"accepted tasks lost in the crash: {missing}"

    # ... and the beat's sync job, with no hand-run sync, brings every task home: each task final, each
    # outcome recorded once; a guarded task acts once; an unguarded one acts again only after a run of it
    # was fenced off by a lost claim (a late report), never more often. (Tasks the API committed but could
    # not answer 202 for, the crash cutting its reply, are in the ledger too and are checked the same way.)
    unguarded = {task_id for task_id, params in parameters.items() if not params.get("check_fence")}
    tasks = assert_nothing_lost(database, effects, stored, timeout=75, unguarded=unguarded)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, {
        k: v for k, v in tasks.items() if v["state"] != "SUCCEEDED"
    }

    # And nothing was restarted: the API, both agents and the beat reconnected by themselves
    assert all(p.poll() is None for p in system.processes), [p.returncode for p in system.processes]
    with session_scope(database) as session:
        runners = set(session.scalars(select(SyncRun.runner).where(SyncRun.started_at >= _utc(restarted_at))))
    assert runners and all(r.startswith("beat:") for r in runners), runners

    late = {k: v["late_reports"] for k, v in tasks.items() if v["late_reports"]}
    counts = effects.counts()
    print(
        f"\n{fault.name}: {len(stored)} tasks ({len(accepted)} answered 202, {len(submitter.refused)} refused); "
        f"{len(late)} run(s) fenced off by a lost claim {sorted(late)}; "
        f"unguarded tasks that acted twice: {sorted(k for k in late if counts[k] > 1)}"
    )


def _utc(epoch_s: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC)
