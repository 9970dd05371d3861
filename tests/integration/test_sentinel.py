"""Redis behind Sentinel: a real API, two agents and a beat follow two master failovers under load.

A private master, one replica and three Sentinels (:mod:`tests.support.redis_sentinel`, passwords on
both the servers and the Sentinels) and a private PostgreSQL, so the beat's sync job sees this test's
tasks only. While tasks stream in, the master is killed (Sentinel promotes the replica), the old master
comes back empty and becomes a replica, and then a planned ``SENTINEL FAILOVER`` moves the master back.
No process is restarted. The replica is asynchronous, so a message the dead master had not passed on
is lost with it: the beat's sync job dispatches such tasks again, and the ledger's dispatch fence keeps
every effect to one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import wait_for
from tests.faults import conftest as faults
from tests.faults.conftest import HttpSubmitter, assert_nothing_lost, settle, start_system
from tests.support.redis_sentinel import SentinelGroup, running_sentinel_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The fault suite's fixtures, shared with this test: the effects ledger and a private PostgreSQL.
effects = faults.effects
private_postgres = faults.private_postgres


@pytest.fixture()
def sentinels(tmp_path: Path) -> Iterator[SentinelGroup]:
    """Request it before ``start_worker``/``start_api`` so the processes stop before Redis is killed."""
    with running_sentinel_group(
        tmp_path / "redis", password=f"pw-{uuid.uuid4().hex[:8]}", sentinel_password=f"spw-{uuid.uuid4().hex[:8]}"
    ) as group:
        yield group


def _redis_clients_of_this_process(settings: Any) -> dict[str, Any]:
    """AIOS's own Redis users in the test process, made before any failover and kept across them."""
    from aios.broker.celery_app import create_celery_app
    from aios.security.store import RedisStore, create_store

    store = create_store(settings)
    assert isinstance(store, RedisStore)
    return {"store": store, "celery": create_celery_app(settings)}


def _roles(group: SentinelGroup, master: Any) -> str:
    """Who is what, for a failure message."""
    import redis

    roles = []
    for server in group.data:
        client = server.client()
        try:
            roles.append(f"{server.node.addr}: {client.info('replication').get('role')}")
        except redis.RedisError as exc:
            roles.append(f"{server.node.addr}: {exc}")
        finally:
            client.close()
    return f"expected master {master.node.addr}; Sentinels name {group.named_masters()}; {roles}"


def _check_clients_on(group: SentinelGroup, master: Any, clients: dict[str, Any], settings: Any, queue: str) -> None:
    """The security store, the routing rotation and the queue depths work, on ``master``."""
    from aios.agents.rotation import with_state
    from aios.broker.queues import describe_queues

    direct = master.client()
    try:
        key = f"probe:{uuid.uuid4().hex[:8]}"
        assert clients["store"].hit(key, 60)[0] == 1  # 0 would be the store failing open
        assert direct.exists(f"{settings.broker.key_prefix}aios:sec:{key}") == 1, _roles(group, master)
        turn = f"probe-{uuid.uuid4().hex[:8]}"
        assert with_state(settings, turn, lambda state: (state.get("n", 0) + 1, {"n": state.get("n", 0) + 1})) == 1
        assert direct.exists(f"{settings.broker.key_prefix}aios:routing:{turn}") == 1
        (info,) = describe_queues(clients["celery"], settings, [queue])
        assert info.name == queue
    finally:
        direct.close()


def test_api_agents_and_beat_follow_sentinel_failovers_under_load_and_every_task_finishes_once(
    sentinels, private_postgres, stack, start_api, start_worker, start_beat, effects, queue
):
    # Given an API, two agents and a beat whose broker is the Sentinel group (sync every 2 s)
    starters = {"start_api": start_api, "start_worker": start_worker, "start_beat": start_beat}
    system = start_system(stack, private_postgres.url, queue, env=sentinels.env(), **starters)
    processes = {p.pid: p for p in system.processes}
    settings = stack.override(
        database={"url": private_postgres.url},
        broker={
            "url": sentinels.url,
            "sentinel_master": sentinels.master_name,
            "sentinel_password": sentinels.sentinel_password,
        },
    ).settings
    clients = _redis_clients_of_this_process(settings)
    _check_clients_on(sentinels, sentinels.master(), clients, settings, queue)

    # And a steady stream of submissions, running as they come
    submitter = HttpSubmitter(system.api.url, system.admin.key, effects, queue, interval_s=0.3)
    submitter.start()
    try:
        wait_for(lambda: len(effects.counts()) >= 4, timeout=60, what="the first tasks to run")

        # When the master dies and Sentinel promotes the replica
        old, new = sentinels.kill_master()
        settle(4)
        _check_clients_on(sentinels, new, clients, settings, queue)

        # And the old master comes back (empty) and becomes a replica of the new one
        old.start()
        sentinels.wait_ready()
        settle(2)

        # And a planned failover moves the master back to it (both are masters for a few seconds, until
        # Sentinel demotes the other: what was written there meanwhile is lost when it resyncs)
        _, back = sentinels.failover()
        assert back is old
        settle(4)
    finally:
        submitter.stop()

    # Then every submission was answered 202 (PENDING at worst, while no master was reachable)
    assert submitter.refused == [], submitter.refused
    accepted = submitter.accepted
    assert len(accepted) >= 20, len(accepted)

    # And every accepted task reached SUCCEEDED exactly once, one effect each
    try:
        tasks = assert_nothing_lost(system.database, effects, accepted, timeout=120)
    except AssertionError as exc:
        logs = "\n".join(f"--- {w.hostname}:\n{w.log()[-2500:]}" for w in system.workers)
        raise AssertionError(f"{exc}\n--- beat:\n{system.beat.log()[-2500:]}\n{logs}") from None
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, {
        k: v for k, v in tasks.items() if v["state"] != "SUCCEEDED"
    }

    # And no process was restarted: the same API, agents and beat, all still running
    assert {pid: p.poll() for pid, p in processes.items()} == dict.fromkeys(processes)

    # And every agent is consuming from the current master: a task submitted now runs
    answer = requests.post(
        f"{system.api.url}/api/v1/tasks",
        json=effects.task(queue),
        headers={"X-API-Key": system.admin.key},
        timeout=30,
    )
    assert answer.status_code == 202 and answer.json()["state"] == "QUEUED", answer.text
    assert_nothing_lost(system.database, effects, [*accepted, answer.json()["id"]], timeout=60)

    # And the security store, the rotation and the queue depths of a process that lived through both
    # failovers work against the current master, and so do the API's
    _check_clients_on(sentinels, back, clients, settings, queue)
    queues = requests.get(f"{system.api.url}/api/v1/queues", headers={"X-API-Key": system.admin.key}, timeout=30)
    assert queues.status_code == 200, queues.text
    clients["celery"].pool.force_close_all()


def test_the_redis_topology_names_the_master_its_replica_and_each_sentinel_and_reports_what_is_down(sentinels):
    from aios.broker.redis_clients import redis_topology
    from aios.config import BrokerSettings

    broker = BrokerSettings(
        url=sentinels.url, sentinel_master=sentinels.master_name, sentinel_password=sentinels.sentinel_password or ""
    )
    master, replica = sentinels.data

    # Given a healthy group: the master, its replica with its link up, three Sentinels agreeing, the quorum
    topology = redis_topology(broker)
    assert (topology.mode, topology.master, topology.quorum, topology.error) == ("sentinel", master.node.addr, 2, None)
    assert [(r.addr, r.state, r.link) for r in topology.replicas] == [(replica.node.addr, "online", "ok")]
    assert all(r.lag_bytes is not None and r.lag_bytes >= 0 for r in topology.replicas)
    assert [(s.addr, s.reachable, s.master) for s in topology.sentinels] == [
        (s.node.addr, True, master.node.addr) for s in sentinels.sentinels
    ]
    assert topology.to_dict()["replicas"][0]["addr"] == replica.node.addr

    # When a Sentinel and the replica die
    sentinels.sentinels[0].kill()
    replica.kill()

    # Then the report says so instead of failing
    def replica_seen_down() -> Any:
        seen = redis_topology(broker)
        return seen.replicas and "s_down" in seen.replicas[0].state and seen

    topology = wait_for(replica_seen_down, timeout=30, interval=0.5, what="Sentinel to see the replica down")
    assert topology.master == master.node.addr
    assert [s.reachable for s in topology.sentinels] == [False, True, True]
    assert topology.sentinels[0].error

    # And with no Redis at all the report is an error, not an exception
    gone = redis_topology(BrokerSettings(url=f"redis://127.0.0.1:{replica.node.port}/0"))
    assert (gone.mode, gone.master, gone.replicas) == ("single", replica.node.addr, [])
    assert gone.error and "Connection" in gone.error
