"""Two sites, one AIOS: the failover scenarios of docs/ha.md on real servers in two network namespaces.

Site A (``10.X.0.1``) runs the PostgreSQL primary, the Redis master and one Sentinel; site B
(``10.X.0.2``) the synchronous standby, the replica and two Sentinels; each site runs an AIOS API, an
agent and a beat with the same settings (the multi-host PostgreSQL URL and the Sentinel URL of
docs/ha.md). The pair is built once for the module (:func:`pair`) and the scenarios run in an order that
leaves it fit for the next one: Redis fails over and back, PostgreSQL switches over and back, site A is
lost, site A returns. Each scenario streams submissions to both sites' APIs through its fault and ends
with the same check: every task answered ``202`` reached ``SUCCEEDED`` exactly once (one success event),
nothing is left unfinished.

The times a fault costs (until site B accepts a write, until a task runs there) are printed and kept in
``pair.times``; they are measured, never asserted (the machine is shared): ``bench/ha_failover.py``
reports them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import BEAT_TEST_ENV, make_user, require_program, requirement_missing, wait_for
from tests.faults.conftest import FAST_SYNC, Effects, assert_nothing_lost, settle
from tests.support.agent_helpers import FAST_BEATS
from tests.support.ha_sites import (
    Pair,
    Sites,
    SitesUnavailable,
    create_sites,
    first_run_after,
    first_write_after,
    longest_write_gap,
    postgres_bindir,
    start_pair,
    timed_submitter,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: How long load runs before a fault and after it.
BEFORE_S = 3.0
AFTER_S = 8.0


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    try:
        made = create_sites()
    except (SitesUnavailable, FileNotFoundError) as exc:
        requirement_missing("two network namespaces on a bridge (ip netns, veth, as root)", str(exc))
    try:
        yield made
    finally:
        made.teardown()


@pytest.fixture(scope="module")
def pair(sites: Sites, stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """The two sites with PostgreSQL, Redis, the Sentinels and AIOS on both, shared by the scenarios."""
    require_program("redis-server", "apt-get install redis-server")
    if postgres_bindir() is None:
        requirement_missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)", "not installed")
    # FAST_SYNC after BEAT_TEST_ENV (which turns the sync job off): the sync job re-dispatches what a
    # failover dropped, and every scenario here needs it
    env = {**stack.env, **FAST_BEATS, **BEAT_TEST_ENV, **FAST_SYNC}
    built = start_pair(sites, tmp_path_factory.mktemp("ha"), env, f"ha{uuid.uuid4().hex[:10]}")
    try:
        yield built
    finally:
        from aios.db import dispose_engines

        dispose_engines()
        built.stop()


@pytest.fixture(scope="module")
def world(pair: Pair, stack: Any) -> Any:
    """The pair's settings (the multi-host URL: reads follow the primary) and an admin's key."""
    own = stack.override(database={"url": pair.url})
    return own, make_user(own, "admin")


def under_load(pair: Pair, world: Any, effects: Effects, fault: Any, *, after_s: float = AFTER_S) -> tuple[list, Any]:
    """Submit to every running site's API every 0.3 s; after :data:`BEFORE_S`, run ``fault()``, keep going
    ``after_s``; returns (the submitters, what ``fault`` returned)."""
    _, admin = world
    submitters = [timed_submitter(aios.url, admin.key, effects, pair.queue) for aios in pair.aios.values()]
    for submitter in submitters:
        submitter.start()
    try:
        wait_for(lambda: len(effects.counts()) >= 2, timeout=60, what="the first tasks to run")
        settle(BEFORE_S)
        began = time.time()
        result = fault()
        settle(after_s)
    finally:
        for submitter in submitters:
            submitter.stop()
    gaps = {site: round(longest_write_gap(s, began), 1) for site, s in zip(pair.aios, submitters, strict=True)}
    refused = {site: len(s.refused) for site, s in zip(pair.aios, submitters, strict=True)}
    print(f"\n{getattr(fault, '__name__', 'fault')}: longest gap between 202s per site {gaps} s, refused {refused}")
    return submitters, result


def assert_every_accepted_task_succeeded_once(
    world: Any, effects: Effects, submitters: list, *, killed_after_effect: set[str] | frozenset[str] = frozenset()
) -> dict[str, Any]:
    own, _ = world
    ids = [task_id for submitter in submitters for task_id in submitter.accepted]
    assert ids, "no submission was accepted"
    tasks = assert_nothing_lost(
        own.settings.database, effects, ids, timeout=240, killed_after_effect=killed_after_effect
    )
    not_succeeded = {task_id: t["transitions"] for task_id, t in tasks.items() if t["state"] != "SUCCEEDED"}
    assert not not_succeeded, f"accepted tasks that did not succeed: {not_succeeded}"
    return tasks


def test_a_redis_failover_under_load_on_both_sites_loses_nothing_and_runs_each_task_once(pair, world, tmp_path):
    # Given the pair at home (PostgreSQL primary and Redis master on site A) and load on both APIs
    assert pair.redis_master_site() == "a" and pair.pg_primary == "a"
    effects = Effects(tmp_path / "effects.txt")

    # When the Redis master dies (SIGKILL) and Sentinel elects site B's replica; then it returns, empty
    def fail_redis_over() -> str:
        old, new = pair.redis.kill_master()
        old.start()
        return new.node.host

    submitters, new_master = under_load(pair, world, effects, fail_redis_over)

    # Then every accepted task succeeded exactly once, on processes none of which was restarted
    assert new_master == pair.sites.b.address
    assert_every_accepted_task_succeeded_once(world, effects, submitters)
    assert all(process.alive for aios in pair.aios.values() for process in aios.processes)
    # (the pair goes home for the next scenario: a planned failover back to site A)
    pair.redis_failover_to("a")


def test_a_postgres_switchover_and_back_under_load_loses_nothing_and_runs_each_task_once(pair, world, tmp_path):
    # Given the pair at home and load on both APIs
    assert pair.pg_primary == "a"
    effects = Effects(tmp_path / "effects.txt")

    # When the operator switches PostgreSQL over to site B (stop A, promote B, A rejoins as its standby)
    # and, under the same load, back to site A
    def switch_over_and_back() -> list[bool]:
        pair.switchover()
        in_recovery = [pair.pg["a"].in_recovery(), pair.pg["b"].in_recovery()]
        settle(AFTER_S / 2)
        pair.switchover()
        return in_recovery

    submitters, in_recovery = under_load(pair, world, effects, switch_over_and_back)

    # Then B was the primary in between, and every accepted task succeeded exactly once
    assert in_recovery == [True, False]
    assert pair.pg_primary == "a" and not pair.pg["a"].in_recovery() and pair.pg["b"].in_recovery()
    assert_every_accepted_task_succeeded_once(world, effects, submitters)
    assert all(process.alive for aios in pair.aios.values() for process in aios.processes)


def test_when_site_a_is_lost_site_b_takes_over_and_finishes_every_accepted_task_once(pair, world, tmp_path):
    # Given the pair at home and load on both APIs
    assert pair.pg_primary == "a" and pair.redis_master_site() == "a"
    effects = Effects(tmp_path / "effects.txt")
    lost: dict[str, Any] = {}

    # When every process of site A is SIGKILLed and its link cut; Patroni promotes B's PostgreSQL and
    # Sentinel (two of three left, quorum 2) fails Redis over
    def lose_site_a() -> None:
        lost["at"] = time.time()
        lost["victims"] = set(pair.lose_site_a())
        pair.promote("b")
        pair.redis.wait_master_is_not(f"{pair.sites.a.address}:6379")

    submitters, _ = under_load(pair, world, effects, lose_site_a, after_s=20.0)

    # Then site B accepted writes again and ran tasks, and every task accepted on either site (before the
    # loss too: synchronous replication put it on B) succeeded exactly once
    b = next(s for s in submitters if s.url == pair.aios["b"].url)
    first_write = first_write_after(b, lost["at"])
    assert first_write is not None, f"site B accepted nothing after site A was lost: {b.refused[-10:]}"
    own, _ = world
    killed_mid_run = {task_id for task_id, _, pid in effects.starts() if pid in lost["victims"]}
    assert_every_accepted_task_succeeded_once(world, effects, submitters, killed_after_effect=killed_mid_run)
    first_run = first_run_after(own.settings.database, lost["at"], pair.aios["b"].hostname)
    assert first_run is not None
    pair.times = {"first_202_on_b_s": first_write - lost["at"], "first_run_on_b_s": first_run - lost["at"]}
    print(f"\nsite A lost: {pair.times}")


def test_the_old_primary_site_returns_as_a_standby_and_takes_no_write(pair, world, tmp_path):
    # Given site A lost and site B running alone (the previous scenario, or done here when run alone)
    if not pair.a_lost:
        pair.lose_site_a()
        pair.promote("b")
        pair.redis.wait_master_is_not(f"{pair.sites.a.address}:6379")
    effects = Effects(tmp_path / "effects.txt")

    # When site A comes back as Patroni brings it: link up, PostgreSQL rewound into a standby of B, Redis a
    # replica, its Sentinel and its AIOS started again; and load goes to both sites' APIs
    pair.bring_back_site_a()
    submitters, _ = under_load(pair, world, effects, lambda: None)

    # Then A's PostgreSQL is a standby and B's the primary, Redis's master stays on B
    assert pair.pg["a"].in_recovery() and not pair.pg["b"].in_recovery()
    assert pair.redis_master_site() == "b"
    # And every task accepted on either site (A's API writes through to B) succeeded exactly once
    a = next(s for s in submitters if s.url == pair.aios["a"].url)
    assert a.accepted, f"site A's API accepted nothing: {a.refused[-10:]}"
    tasks = assert_every_accepted_task_succeeded_once(world, effects, submitters)
    # And those rows are on A only because B streamed them there: B has them, A refuses a write
    some = next(iter(tasks))
    assert pair.pg["b"].sql(f"SELECT state FROM tasks WHERE id = '{some}'", "aios") == "SUCCEEDED"
    wait_for(
        lambda: pair.pg["a"].sql(f"SELECT state FROM tasks WHERE id = '{some}'", "aios") == "SUCCEEDED",
        timeout=30,
        what="site A's standby to replay the row",
    )
    with pytest.raises(AssertionError, match="read-only transaction"):
        pair.pg["a"].sql(f"UPDATE tasks SET state = 'FAILED' WHERE id = '{some}'", "aios")
    # And no AIOS process of either site holds a connection to A's server (reads only on B)
    # (libpq's read-write probe connects and leaves at once; a connection that stays would be a reader)
    wait_for(
        lambda: pair.pg["a"].sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'aios'") == "0",
        timeout=10,
        what="no AIOS connection to stay on site A's standby",
    )
