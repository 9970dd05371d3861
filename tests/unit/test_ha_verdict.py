"""The verdict of `aios ha status`: what stands between the pair and a failover that loses nothing."""

from __future__ import annotations

from datetime import timedelta

from aios.broker.redis_clients import RedisReplica, RedisSentinel, RedisTopology
from aios.ops.ha import HaStatus, render
from aios.ops.pg_replication import PgHost, PgStandby, PgTopology
from aios.timeutil import utcnow
from aios.timing.lease import LeaseInfo

A, B = "10.0.1.2:5432", "10.0.2.2:5432"


def standby(sync_state: str = "sync", state: str = "streaming") -> PgStandby:
    return PgStandby("siteB", "10.0.2.2", state, sync_state, 0.001, 0.001, 0.002, 0)


def database(*standbys: PgStandby, primary: str | None = A, error: str | None = None) -> PgTopology:
    hosts = (PgHost(A, True, "primary", 1), PgHost(B, True, "standby", 1))
    return PgTopology("multi-host", hosts, primary, tuple(standbys), error)


def broker(replica_state: str = "online", sentinels_up: int = 3) -> RedisTopology:
    sentinels = [RedisSentinel(f"10.0.0.{i}:26379", i < sentinels_up, "10.0.1.2:6379") for i in range(3)]
    replicas = [RedisReplica("10.0.2.2:6379", replica_state, "ok", 100, 0)]
    return RedisTopology("sentinel", "10.0.1.2:6379", replicas, sentinels, quorum=2)


LEADER = LeaseInfo("beat", "beat@siteA", utcnow() + timedelta(seconds=30))


def test_a_pair_with_a_synchronous_standby_a_replica_and_a_leader_is_healthy():
    status = HaStatus(database(standby()), broker(), LEADER)
    assert status.problems == []
    assert "verdict: healthy" in render(status)


def test_an_asynchronous_standby_is_a_problem_because_a_202_is_not_yet_on_both_sites():
    (problem,) = HaStatus(database(standby(sync_state="async")), broker(), LEADER).problems
    assert "siteB is async" in problem and "synchronous_standby_names" in problem


def test_no_standby_no_replica_too_few_sentinels_and_no_leader_are_each_named():
    problems = HaStatus(database(), broker(replica_state="wait_bgsave", sentinels_up=1), None).problems
    assert problems == [
        f"database: primary {A} has no standby streaming from it",
        "broker: master 10.0.1.2:6379 has no replica in sync",
        "broker: 1 Sentinel(s) reachable, fewer than the quorum 2",
        "beat: no live leader (periodic jobs and sync are not running)",
    ]


def test_a_split_brain_is_reported_in_the_databases_own_words():
    split = database(primary=None, error=f"more than one server takes writes ({A}, {B}): a split brain")
    (problem, *_rest) = HaStatus(split, broker(), LEADER).problems
    assert "split brain" in problem and "503" in problem
