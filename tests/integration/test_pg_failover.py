"""PostgreSQL failover: a multi-host URL end to end, a planned switchover under load, and an old primary
that comes back as a standby and never takes a write (issue 18; docs/ha.md).

One replicated pair per module (:mod:`tests.support.pg_cluster`: ``initdb``, a synchronous standby made
with ``pg_basebackup``, both on loopback ports of their own; the shared PostgreSQL is never touched).
Every test starts from "one primary, one synchronous standby streaming from it", whichever of the two
is primary by then, and leaves the pair that way: each switchover ends with the old primary rejoined.
AIOS finds the primary only through the URL's ``target_session_attrs=read-write``; it never promotes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, make_user, wait_for
from tests.faults.conftest import Effects, HttpSubmitter, assert_nothing_lost, settle, start_system
from tests.support.pg_cluster import PgNode, loopback_pair, rejoin_as_standby

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Seconds between stopping the primary and promoting the standby: the window the API answers 503.
SWITCHOVER_GAP_S = 3.0


@dataclass
class Pair:
    """Two servers, one primary and one synchronous standby; which is which changes with each switchover."""

    nodes: tuple[PgNode, PgNode]

    @property
    def primary(self) -> PgNode:
        (node,) = [node for node in self.nodes if node.is_running() and not node.in_recovery()]
        return node

    @property
    def standby(self) -> PgNode:
        (node,) = [node for node in self.nodes if node is not self.primary]
        return node

    def url(self, database: str = "aios", *, first: PgNode | None = None, read_write: bool = True) -> str:
        """The failover form of the URL (docs/ha.md), ``first`` (default: site A) listed first;
        ``read_write`` False leaves out ``target_session_attrs`` (libpq then keeps the first it reaches)."""
        first = first or self.nodes[0]
        hosts = "&".join(f"host={node.addr}" for node in (first, *(n for n in self.nodes if n is not first)))
        attrs = "&target_session_attrs=read-write" if read_write else ""
        return f"postgresql+psycopg2://postgres@/{database}?{hosts}{attrs}"

    def stop_primary_and_promote(self, gap_s: float = 0.0) -> tuple[PgNode, PgNode]:
        """A planned switchover, as an operator does it by hand: stop the primary (fast: its sessions
        are cut), then promote the standby. Returns ``(old, new)`` primary."""
        old, new = self.primary, self.standby
        old.stop("fast")
        settle(gap_s)
        new.promote()  # commits wait for no standby until the old primary rejoins
        return old, new

    def rejoin(self, old: PgNode, new: PgNode) -> None:
        """``old`` back as ``new``'s synchronous standby (pg_rewind), as Patroni would."""
        rejoin_as_standby(old, new, application_name=old.name)
        new.set_synchronous(old.name)
        new.wait_streaming(old.name, sync=True)


@pytest.fixture(scope="module")
def pg_pair() -> Iterator[Pair]:
    """Site A primary, site B its synchronous standby, database ``aios`` migrated through the multi-host URL."""
    from aios import migrate
    from aios.config import DatabaseSettings
    from aios.db import dispose_engines

    with loopback_pair() as nodes:
        pair = Pair(nodes)
        try:
            migrate.upgrade(DatabaseSettings(url=pair.url()))
            yield pair
        finally:
            dispose_engines()


@pytest.fixture()
def effects(tmp_path: Path) -> Effects:
    return Effects(tmp_path / "effects.txt")


def _stored_tasks(database: object, queue: str) -> list[str]:
    """Ids of every task on ``queue`` in the ledger: answered 202 or not (a commit whose answer was cut)."""
    from sqlalchemy import select

    from aios.db import session_scope
    from aios.models import Task

    with session_scope(database) as session:  # type: ignore[arg-type]
        return list(session.scalars(select(Task.id).where(Task.queue == queue)))


def test_a_multi_host_url_runs_tasks_and_backs_up_and_restores_through_it(
    pg_pair, stack, start_api, start_worker, start_beat, effects, queue
):
    from aios.ops.backup import create_backup, restore_backup, verify_backup

    # Given the failover URL with the *standby* listed first: only target_session_attrs finds the primary
    url = pg_pair.url(first=pg_pair.standby)
    system = start_system(stack, url, queue, start_api=start_api, start_worker=start_worker, start_beat=start_beat)

    # When tasks are submitted to a real API, run by real agents, watched by a real beat
    session = requests.Session()
    session.headers["X-API-Key"] = system.admin.key
    task_ids = []
    for _ in range(6):
        answer = session.post(f"{system.api.url}/api/v1/tasks", json=effects.task(queue), timeout=30)
        assert answer.status_code == 202, answer.text
        task_ids.append(answer.json()["id"])

    # Then each runs once and succeeds
    tasks = assert_nothing_lost(system.database, effects, task_ids, timeout=90)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, tasks

    # And a backup taken through the same URL verifies, and restores into an empty database on the primary
    settings = stack.override(database={"url": url}).settings
    row = create_backup(settings)
    assert row["status"] == "ok", row
    assert verify_backup(row["path"], settings)["ok"]
    target = f"aios_restore_{uuid.uuid4().hex[:8]}"
    pg_pair.primary.create_database(target)
    # (libpq stops at a server that refuses the login, so the new database must have reached the standby)
    wait_for(
        lambda: pg_pair.standby.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{target}'") == "1",
        timeout=30,
        what=f"database {target} to replicate to the standby",
    )
    # (the target URL lists the standby first and does not ask for the primary: the restore does)
    target_url = pg_pair.url(target, first=pg_pair.standby, read_write=False)
    restored = restore_backup(row["path"], stack.override(database={"url": target_url}).settings)
    assert restored["restored"]
    source_count = pg_pair.primary.sql("SELECT count(*) FROM tasks", database="aios")
    assert int(source_count) >= len(task_ids)
    assert pg_pair.primary.sql("SELECT count(*) FROM tasks", database=target) == source_count
    # And the restore reached the standby by replication, not by being written there
    wait_for(
        lambda: pg_pair.standby.sql("SELECT count(*) FROM tasks", database=target) == source_count,
        timeout=30,
        what="the restored rows to replicate to the standby",
    )


def test_a_planned_switchover_under_load_answers_503_meanwhile_and_every_accepted_task_succeeds_once(
    pg_pair, stack, start_api, start_worker, start_beat, effects, queue
):
    # Given an API, two agents and a beat on the failover URL, and a steady stream of submissions
    system = start_system(
        stack, pg_pair.url(), queue, start_api=start_api, start_worker=start_worker, start_beat=start_beat
    )
    submitter = HttpSubmitter(system.api.url, system.admin.key, effects, queue)
    submitter.start()
    try:
        wait_for(lambda: len(effects.counts()) >= 8, timeout=60, what="the first tasks to run")

        # When the primary is stopped and, a few seconds later, the standby promoted (the stream going on)
        old, new = pg_pair.stop_primary_and_promote(SWITCHOVER_GAP_S)
        accepted_at_promotion = len(submitter.accepted)

        # Then the API accepts again without a restart
        wait_for(
            lambda: len(submitter.accepted) >= accepted_at_promotion + 8,
            timeout=60,
            what="submissions to be accepted on the promoted server",
        )
        settle(2)
    finally:
        submitter.stop()

    # And meanwhile it answered 503, never a 500 nor a dropped connection
    assert 503 in submitter.refused, submitter.refused
    assert set(submitter.refused) == {503}, submitter.refused

    # And every task answered 202 (and any the API stored but could not answer) runs and succeeds exactly once
    stored = _stored_tasks(system.database, queue)
    assert not set(submitter.accepted) - set(stored), "accepted tasks lost in the switchover"
    tasks = assert_nothing_lost(system.database, effects, stored, timeout=90)
    assert {t["state"] for t in tasks.values()} == {"SUCCEEDED"}, {
        k: v for k, v in tasks.items() if v["state"] != "SUCCEEDED"
    }

    # And nothing was restarted: the API, both agents and the beat found the new primary by themselves
    assert all(p.poll() is None for p in system.processes), [p.returncode for p in system.processes]
    assert pg_pair.primary is new
    pg_pair.rejoin(old, new)


def test_an_old_primary_rejoined_as_a_standby_never_takes_a_write(pg_pair, stack):
    from sqlalchemy import text

    from aios.broker.celery_app import create_celery_app
    from aios.config import DatabaseSettings
    from aios.db import ReadOnlyServer, session_scope
    from aios.ops.pg_replication import pg_topology
    from aios.tasks import states
    from tests.conftest import authorize
    from webapi.app import create_app

    # Given a switchover, and the old primary rejoined (pg_rewind) as the new one's synchronous standby
    old, new = pg_pair.stop_primary_and_promote()
    pg_pair.rejoin(old, new)

    # Then `aios ha status` sees it so: the new primary, the old one streaming from it as its sync standby
    topology = pg_topology(DatabaseSettings(url=pg_pair.url()))
    assert topology.error is None and topology.primary == new.addr, topology
    roles = {host.addr: host.role for host in topology.hosts}
    assert roles == {new.addr: "primary", old.addr: "standby"}, topology
    assert [(s.application_name, s.state, s.sync_state) for s in topology.standbys] == [
        (old.name, "streaming", "sync")
    ], topology
    (old_host,) = [host for host in topology.hosts if host.addr == old.addr]
    assert old_host.receiver is not None and old_host.receiver.status == "streaming", old_host
    assert old_host.timeline is not None and old_host.timeline >= 2, old_host
    # (and a server that is down is reported as such, never raised: here a port nothing listens on)
    closed = f"127.0.0.1:{free_port()}"
    with_dead = pg_topology(DatabaseSettings(url=f"{pg_pair.url()}&host={closed}"))
    assert with_dead.primary == new.addr and with_dead.error is None, with_dead
    (dead,) = [host for host in with_dead.hosts if host.addr == closed]
    assert not dead.reachable and dead.role is None and dead.error, dead

    # And a URL naming only the old primary cannot write through the engine ...
    only_old = stack.override(database={"url": old.url()})
    with pytest.raises(ReadOnlyServer) as raised, session_scope(only_old.settings.database) as session:
        session.execute(text("UPDATE tasks SET priority = priority WHERE id = 'none'"))
    assert raised.value.connection_invalidated

    # ... nor through the agents' one-statement claim (their raw connection) ...
    with pytest.raises(ReadOnlyServer):
        states.claim(only_old.settings, "no-such-task", "no-dispatch", "agent", actor="worker:agent", detail={})

    # ... and the API on it answers a submit with 503 (an outage: try again), not 500, reads still 200
    admin = make_user(stack.override(database={"url": pg_pair.url()}), "admin")
    app = create_app(only_old.settings, create_celery_app(only_old.settings))
    client = authorize(app.test_client(), admin.key)
    posted = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {}})
    assert posted.status_code == 503, (posted.status_code, posted.get_data(as_text=True)[:500])
    assert posted.json["error"] == "database_unavailable" and posted.headers.get("Retry-After")
    ready = app.test_client().get("/readyz")
    assert ready.status_code == 503 and not ready.json["checks"]["database"]["ok"], ready.json
    assert "standby" in ready.json["checks"]["database"]["error"], ready.json

    # And the failover URL with the old primary listed first still writes only to the new primary
    both = stack.override(database={"url": pg_pair.url(first=old)})
    client = authorize(create_app(both.settings, create_celery_app(both.settings)).test_client(), admin.key)
    posted = client.post("/api/v1/tasks", json={"type": "echo", "parameters": {}, "queue": f"q{uuid.uuid4().hex[:6]}"})
    assert posted.status_code == 202, posted.get_data(as_text=True)[:500]
    task_id = posted.json["id"]
    assert new.sql(f"SELECT count(*) FROM tasks WHERE id = '{task_id}'", database="aios") == "1"
    # (the 202 waited for the standby to flush the row; it is visible there once replayed)
    deadline = time.monotonic() + 30
    while old.sql(f"SELECT count(*) FROM tasks WHERE id = '{task_id}'", database="aios") != "1":
        assert time.monotonic() < deadline, "the accepted task never reached the standby"
        time.sleep(0.2)
