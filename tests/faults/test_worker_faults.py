"""Faults of a whole worker: SIGKILL with a peer running (``Fault.SIGKILL_WORKER``), and the two warm
shutdowns — SIGTERM (``Fault.SIGTERM_WORKER``) and the remote-control ``shutdown``
(``Fault.CONTROL_SHUTDOWN``) — with a task mid-run.

Workers here beat every second (the peer notices a dead agent in about three) and use a 30 s
visibility timeout, so a message held by a dead worker also comes back from Redis within the test.
"""

from __future__ import annotations

import pytest

from tests.faults.conftest import assert_nothing_lost, control_shutdown, kill_worker, owner, term_worker
from tests.support.agent_helpers import FAST_BEATS, submit

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Fast heartbeats plus a short visibility timeout (it must exceed task_timeout_s + timeout_grace_s).
FAULT_ENV = {**FAST_BEATS, "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "30", "AIOS_ORCHESTRATOR__TASK_TIMEOUT_S": "20"}


def test_a_worker_killed_outright_with_a_peer_running_has_its_task_finished_once_by_the_peer(
    client, start_worker, stack, effects, queue
):
    # Given two workers on one queue, and a 4 s task running on one of them
    workers = [start_worker([queue], concurrency=2, env=FAULT_ENV) for _ in range(2)]
    victim = submit(client, effects.task(queue, sleep_s=4))
    doomed = owner(workers, effects.wait_started(victim))
    (peer,) = [w for w in workers if w is not doomed]
    # And more work submitted around the fault
    others = [submit(client, effects.task(queue, sleep_s=0.5)) for _ in range(4)]

    # When the worker running it is SIGKILLed with all its pool processes
    kill_worker(doomed)
    others += [submit(client, effects.task(queue, sleep_s=0.2)) for _ in range(4)]

    # Then nothing is lost, and every task succeeded
    tasks = assert_nothing_lost(stack.settings.database, effects, [victim, *others], timeout=90)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks

    # And the killed task finished on the peer, on its second attempt
    assert tasks[victim]["agent"] == peer.hostname
    assert tasks[victim]["attempts"] == 2
    assert peer.process.poll() is None


@pytest.mark.parametrize("how", ["sigterm", "control_shutdown"])
def test_a_worker_shut_down_warm_mid_task_finishes_it_and_gives_back_the_rest(
    how, client, start_worker, stack, celery_client, effects, queue
):
    # Given one worker (one pool process) running a 4 s task, with three more tasks waiting
    leaving = start_worker([queue], concurrency=1, env=FAULT_ENV)
    victim = submit(client, effects.task(queue, sleep_s=4))
    effects.wait_started(victim)
    waiting = [submit(client, effects.task(queue, sleep_s=0.2)) for _ in range(3)]

    # When it is told to shut down (SIGTERM, or the remote-control shutdown)
    if how == "sigterm":
        term_worker(leaving)
    else:
        control_shutdown(celery_client, stack.settings, leaving.hostname)

    # Then it finishes the running task and exits cleanly
    assert leaving.process.wait(timeout=60) == 0, leaving.log()[-3000:]

    # And when another worker comes, the waiting tasks run there: nothing is lost or run twice
    taker = start_worker([queue], concurrency=1, env=FAULT_ENV)
    tasks = assert_nothing_lost(stack.settings.database, effects, [victim, *waiting], timeout=90)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks
    assert tasks[victim]["agent"] == leaving.hostname
    assert tasks[victim]["attempts"] == 1
    assert {tasks[t]["agent"] for t in waiting} <= {leaving.hostname, taker.hostname}
