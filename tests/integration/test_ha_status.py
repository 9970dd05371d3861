"""`aios ha status`, the `ha` field of GET /api/v1/status and the replication gauges, on a real pair.

A replicated PostgreSQL pair (primary + synchronous standby, :mod:`tests.support.pg_cluster`) and a Redis
master + replica watched by three Sentinels (:mod:`tests.support.redis_sentinel`), all on loopback ports
of their own. The command runs as a real `aios` process with the failover URLs of docs/ha.md; the API's
status and the metrics collector are read in-process from the same servers. Then the pair is broken
(the primary stopped, the standby promoted; the Redis master killed) and the same views must say so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import REPO_ROOT, wait_for
from tests.support.pg_cluster import PgNode, loopback_pair
from tests.support.redis_sentinel import SentinelGroup, running_sentinel_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Pair:
    primary: PgNode
    standby: PgNode
    sentinels: SentinelGroup

    @property
    def env(self) -> dict[str, str]:
        hosts = f"host={self.primary.addr}&host={self.standby.addr}"
        return {
            "AIOS_DATABASE__URL": f"postgresql+psycopg2://postgres@/aios?{hosts}&target_session_attrs=read-write",
            **self.sentinels.env(),
        }


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    from aios import migrate
    from aios.config import DatabaseSettings
    from aios.db import dispose_engines

    with loopback_pair() as (primary, standby), running_sentinel_group(tmp_path_factory.mktemp("redis")) as group:
        pair = Pair(primary, standby, group)
        try:
            migrate.upgrade(DatabaseSettings(url=pair.env["AIOS_DATABASE__URL"]))
            yield pair
        finally:
            dispose_engines()


def aios_ha_status(pair: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("AIOS_")}
    return subprocess.run(
        [sys.executable, "-m", "aios.cli", "ha", "status", *args],
        env={**clean, **pair.env, "PYTHONPATH": str(REPO_ROOT), "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml")},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def settings_of(pair: Pair):  # noqa: ANN201 - Settings, imported late like the rest of the suite does
    from aios.config import load_settings

    return load_settings(environ={**pair.env, "AIOS_CONFIG": str(REPO_ROOT / "config" / "aios.toml")})


def gauges(settings) -> dict[str, dict[tuple[str, ...], float]]:  # noqa: ANN001
    """The cluster collector's HA series, as {name: {label values: value}}."""
    from aios.ops.cluster_metrics import ClusterCollector

    found: dict[str, dict[tuple[str, ...], float]] = {}
    for family in ClusterCollector(settings, None)._ha():
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sample.labels.values())] = sample.value
    return found


def test_ha_status_shows_both_sites_and_says_what_is_missing(pair):
    # Given a healthy pair and no beat running
    # When `aios ha status --json` runs with the failover URLs
    done = aios_ha_status(pair, "--json")
    status = json.loads(done.stdout)
    # Then it names the PostgreSQL primary, its synchronous standby streaming, and both hosts' roles
    db = status["database"]
    assert db["mode"] == "multi-host" and db["primary"] == pair.primary.addr, done.stdout
    assert {h["addr"]: h["role"] for h in db["hosts"]} == {pair.primary.addr: "primary", pair.standby.addr: "standby"}
    (standby,) = db["standbys"]
    assert (standby["application_name"], standby["state"], standby["sync_state"]) == ("siteB", "streaming", "sync")
    # And the Redis master and its replica as the three Sentinels see them
    broker = status["broker"]
    assert broker["mode"] == "sentinel" and broker["master"] == pair.sentinels.master_addr()
    assert [r["addr"] for r in broker["replicas"]] == [s.node.addr for s in pair.sentinels.data[1:]]
    assert [s["reachable"] for s in broker["sentinels"]] == [True, True, True]
    # And the one problem is the missing beat leader: exit 1, so a probe can alert on it
    assert status["problems"] == ["beat: no live leader (periodic jobs and sync are not running)"]
    assert done.returncode == 1

    # When a beat holds the lease
    from aios.timing import lease
    from aios.timing.beat import LEASE_NAME

    settings = settings_of(pair)
    assert lease.acquire(settings, LEASE_NAME, "beat-test", 120)
    try:
        text = aios_ha_status(pair)
        # Then the pair is healthy (exit 0) and the text view shows the same
        assert text.returncode == 0, text.stdout + text.stderr
        assert "verdict: healthy" in text.stdout
        assert f"{pair.primary.addr}" in text.stdout and "standby siteB" in text.stdout
        assert "beat leader: beat-test" in text.stdout
        # And GET /api/v1/status carries the same view
        from aios.broker.celery_app import create_celery_app
        from webapi.status import cluster_status

        api_view = cluster_status(settings, create_celery_app(settings))["ha"]
        assert api_view["database"]["primary"] == pair.primary.addr
        assert api_view["broker"]["master"] == pair.sentinels.master_addr()
        # And the gauges show the standby synchronous, both primaries, no problem
        series = gauges(settings)
        assert series["aios_pg_standby_synchronous"] == {("siteB",): 1.0}
        assert ("siteB",) in series["aios_pg_replication_lag_seconds"]
        assert series["aios_ha_primary"] == {
            ("postgresql", pair.primary.addr): 1.0,
            ("redis", pair.sentinels.master_addr()): 1.0,
        }
        assert series["aios_ha_problems"] == {(): 0.0}
    finally:
        lease.release(settings, LEASE_NAME, "beat-test")


def test_after_a_failover_the_views_name_the_new_primaries_and_the_missing_standbys(pair):
    from aios.ops.cluster_metrics import ClusterCollector

    settings = settings_of(pair)
    collector = ClusterCollector(settings, None)
    list(collector._ha())  # the scrape before the failover: remembers today's primaries
    old_master = pair.sentinels.master_addr()
    # When site A's PostgreSQL stops and B is promoted, and Sentinel fails the Redis master over
    pair.primary.stop("fast")
    pair.standby.promote()
    pair.sentinels.kill_master()
    new_master = wait_for(
        lambda: pair.sentinels.master_addr() not in (None, old_master) and pair.sentinels.master_addr(),
        timeout=60,
        what="Sentinel to name a new master",
    )
    # Then `aios ha status` names B as primary, A unreachable, and no standby or replica left: exit 1
    done = aios_ha_status(pair, "--json")
    status = json.loads(done.stdout)
    assert done.returncode == 1
    assert status["database"]["primary"] == pair.standby.addr
    assert {h["addr"]: h["reachable"] for h in status["database"]["hosts"]} == {
        pair.primary.addr: False,
        pair.standby.addr: True,
    }
    assert status["broker"]["master"] == new_master
    problems = "\n".join(status["problems"])
    assert f"primary {pair.standby.addr} has no standby streaming from it" in problems
    assert f"master {new_master} has no replica in sync" in problems
    # And the collector counts one change of each engine's primary
    changes = {}
    for family in collector._ha():
        for sample in family.samples:
            if sample.name == "aios_ha_primary_changes_total":
                changes[sample.labels["engine"]] = sample.value
    assert changes == {"postgresql": 1.0, "redis": 1.0}
