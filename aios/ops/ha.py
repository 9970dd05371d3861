"""The pair's health at a glance: which PostgreSQL is primary, how far its standby lags, which Redis is master.

AIOS never replicates or elects anything (docs/ha.md): PostgreSQL streams to its standby, Sentinel
elects the Redis master, the operator's tool promotes PostgreSQL. What AIOS owes the operator is a
clear view of where those engines stand, from the same URLs every AIOS process uses, so that
``aios ha status``, ``GET /api/v1/status`` (its ``ha`` field) and the Prometheus gauges
(:mod:`aios.ops.cluster_metrics`) all tell one story:

- the database: each host of the (multi-host) URL, its role, and the primary's standbys with their
  replication state and lag (:mod:`aios.ops.pg_replication`);
- the broker: the Redis master and its replicas as Sentinel sees them (:mod:`aios.broker.redis_clients`);
- the beat leader (:mod:`aios.timing.lease`).

Reading it never raises on an unreachable server: an unreachable server is exactly what it reports.
The verdict (:attr:`HaStatus.problems`) lists what stands between the pair and a failover that loses
nothing; ``aios ha status`` exits 1 while it is not empty, so a cron job or a probe can alert on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aios.broker.redis_clients import RedisTopology, redis_topology
from aios.config import Settings
from aios.ops.pg_replication import PgTopology, pg_topology
from aios.timeutil import isoformat
from aios.timing import lease
from aios.timing.beat import LEASE_NAME


@dataclass(frozen=True)
class HaStatus:
    database: PgTopology
    broker: RedisTopology
    beat_leader: lease.LeaseInfo | None

    @property
    def problems(self) -> list[str]:
        """What keeps the pair from failing over with nothing lost (empty: healthy, or nothing to pair)."""
        found: list[str] = []
        db = self.database
        if db.mode == "multi-host":
            if db.primary is None:
                found.append(f"database: {db.error or 'no server of database.url takes writes'} (writes answer 503)")
            elif not db.standbys:
                found.append(f"database: primary {db.primary} has no standby streaming from it")
            else:
                for standby in db.standbys:
                    if standby.state != "streaming":
                        found.append(f"database: standby {standby.application_name} is {standby.state}")
                    elif standby.sync_state not in ("sync", "quorum"):
                        found.append(
                            f"database: standby {standby.application_name} is {standby.sync_state}: a 202 is "
                            "not yet on both sites (synchronous_standby_names)"
                        )
            for host in db.hosts:
                if not host.reachable:
                    found.append(f"database: {host.addr} unreachable ({host.error})")
        elif db.error:
            found.append(f"database: {db.error}")
        broker = self.broker
        if broker.mode == "sentinel":
            if broker.master is None:
                found.append(f"broker: Sentinel names no reachable master ({broker.error or 'no answer'})")
            elif not any(replica.state == "online" and replica.link != "err" for replica in broker.replicas):
                found.append(f"broker: master {broker.master} has no replica in sync")
            reachable = sum(1 for sentinel in broker.sentinels if sentinel.reachable)
            if broker.quorum and reachable < broker.quorum:
                found.append(f"broker: {reachable} Sentinel(s) reachable, fewer than the quorum {broker.quorum}")
        elif broker.error:
            found.append(f"broker: {broker.error}")
        if self.beat_leader is None:
            found.append("beat: no live leader (periodic jobs and sync are not running)")
        return found

    def to_dict(self) -> dict[str, Any]:
        leader = self.beat_leader
        return {
            "database": self.database.to_dict(),
            "broker": self.broker.to_dict(),
            "beat_leader": {"holder": leader.holder, "expires_at": isoformat(leader.expires_at)} if leader else None,
            "problems": self.problems,
        }


def has_replication(settings: Settings) -> bool:
    """Whether there is replication to look at: not on the embedded default (SQLite, no Sentinel), where
    the API's status and the metrics skip the probe instead of reporting an empty pair."""
    return not settings.database.is_sqlite or settings.broker.is_sentinel


def ha_status(settings: Settings) -> HaStatus:
    """Ask each engine where it stands now (each host of the URLs on its own, with short timeouts)."""
    try:
        leader = lease.current(settings, LEASE_NAME)
    except Exception:  # noqa: BLE001 - no database: the database part says why; no leader is known
        leader = None
    return HaStatus(
        database=pg_topology(settings.database),
        broker=redis_topology(settings.broker),
        beat_leader=leader if leader is not None and leader.live else None,
    )


def render(status: HaStatus) -> str:
    """``aios ha status`` as text: one block per engine, then the verdict."""
    db, broker = status.database, status.broker
    lines = [f"database ({db.mode})"]
    for host in db.hosts:
        role = host.role or "unreachable"
        detail = f"timeline {host.timeline}" if host.timeline is not None else (host.error or "")
        lines.append(f"  {host.addr:<24} {role:<12} {detail}")
    for standby in db.standbys:
        lag = "" if standby.replay_lag_s is None else f", replay lag {standby.replay_lag_s:.3f} s"
        lines.append(
            f"  standby {standby.application_name} ({standby.client_addr}): {standby.state}, "
            f"{standby.sync_state}, {standby.lag_bytes} bytes behind{lag}"
        )
    if db.error and not db.hosts:
        lines.append(f"  {db.error}")
    lines.append(f"broker ({broker.mode})")
    lines.append(f"  master {broker.master or 'none'}")
    for replica in broker.replicas:
        behind = "" if replica.lag_bytes is None else f", {replica.lag_bytes} bytes behind"
        lines.append(f"  replica {replica.addr}: {replica.state}, link {replica.link or '-'}{behind}")
    for sentinel in broker.sentinels:
        seen = sentinel.master or "-"
        lines.append(f"  sentinel {sentinel.addr}: {'up' if sentinel.reachable else 'unreachable'}, master {seen}")
    if broker.error:
        lines.append(f"  {broker.error}")
    leader = status.beat_leader
    lines.append(f"beat leader: {leader.holder if leader else 'none'}")
    problems = status.problems
    lines.append("verdict: " + ("healthy" if not problems else f"{len(problems)} problem(s)"))
    lines.extend(f"  - {problem}" for problem in problems)
    return "\n".join(lines)
