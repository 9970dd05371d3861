"""Which PostgreSQL server is primary, and how its standbys keep up: the database half of ``aios ha status``.

AIOS never promotes or demotes a server (the operator's tool does: Patroni, or ``pg_promote()`` by hand;
docs/ha.md); it only looks. :func:`pg_topology` connects to each host of ``database.url`` *alone* (not
through the engines' ``target_session_attrs``, which would hide every standby) and asks it what it is:

* every host: reachable or not (with libpq's error), ``pg_is_in_recovery()`` → role, its timeline;
* a primary: its standbys as its ``pg_stat_replication`` reports them (state, ``sync``/``async``, the
  write/flush/replay lag PostgreSQL measures, and the bytes of WAL the standby has yet to replay);
* a standby: its WAL receiver (streaming or not, from where) and how far its replay is behind.

Promises: it never raises for a server that is down, refuses or is slow (each probe has a short
``connect_timeout`` and runs in parallel with the others, so one dead site costs one timeout, not one
per host); two servers that both say "primary" are reported as an error (a split brain), not hidden.
The numbers need the role of ``database.url`` to see other sessions' replication rows: a superuser, or
a member of ``pg_monitor`` (``GRANT pg_monitor TO aios``); without it the lag columns read as None.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Literal

from aios.config import DatabaseSettings
from aios.db import libpq_hosts, libpq_params

#: Seconds libpq may take to reach one host (libpq's minimum is 2).
CONNECT_TIMEOUT_S = 3
#: Longest libpq error text kept per host.
MAX_ERROR_CHARS = 300

Mode = Literal["sqlite", "single", "multi-host"]
Role = Literal["primary", "standby"]


@dataclass(frozen=True)
class PgStandby:
    """One row of the primary's ``pg_stat_replication``: a standby streaming from it."""

    application_name: str
    client_addr: str | None
    state: str | None
    #: ``sync`` (a commit waits for it), ``potential``, ``quorum`` or ``async``.
    sync_state: str | None
    write_lag_s: float | None
    flush_lag_s: float | None
    replay_lag_s: float | None
    #: WAL the primary has written that the standby has not replayed yet.
    lag_bytes: int | None


@dataclass(frozen=True)
class PgReceiver:
    """A standby's own view: its WAL receiver (``pg_stat_wal_receiver``) and its replay delay."""

    #: ``streaming`` when connected to a primary; None when no receiver runs (primary gone, or not set up).
    status: str | None
    sender: str | None
    #: Seconds since the last replayed transaction committed on the primary; 0 when all received WAL is replayed.
    replay_lag_s: float | None
    #: Received WAL not yet replayed.
    lag_bytes: int | None


@dataclass(frozen=True)
class PgHost:
    addr: str
    reachable: bool
    role: Role | None = None
    timeline: int | None = None
    error: str | None = None
    receiver: PgReceiver | None = None


@dataclass(frozen=True)
class PgTopology:
    """What each server of ``database.url`` says it is, at one moment."""

    mode: Mode
    hosts: tuple[PgHost, ...] = ()
    #: ``host:port`` of the one server that takes writes; None when none (or more than one) does.
    primary: str | None = None
    standbys: tuple[PgStandby, ...] = ()
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pg_topology(database: DatabaseSettings) -> PgTopology:
    """Probe every host of ``database.url``; never raises for a server that cannot be reached."""
    if database.is_sqlite:
        return PgTopology(mode="sqlite")
    try:
        params, password = libpq_params(database.url)
    except Exception as exc:  # noqa: BLE001 - a status command reports, it does not crash
        return PgTopology(mode="single", error=f"database.url cannot be read: {type(exc).__name__}: {exc}")
    addresses = libpq_hosts(params)
    with ThreadPoolExecutor(max_workers=len(addresses)) as pool:
        probed = list(pool.map(lambda hp: _probe(params, password, *hp), addresses))
    hosts = tuple(host for host, _ in probed)
    primaries = [host for host in hosts if host.role == "primary"]
    mode: Mode = "multi-host" if len(addresses) > 1 else "single"
    if len(primaries) == 1:
        standbys = next(rows for host, rows in probed if host.role == "primary")
        return PgTopology(mode=mode, hosts=hosts, primary=primaries[0].addr, standbys=standbys)
    if primaries:
        names = ", ".join(host.addr for host in primaries)
        error = f"more than one server takes writes ({names}): a split brain; fence all but one (docs/ha.md)"
    elif any(host.reachable for host in hosts):
        error = "no server takes writes: every reachable one is a standby; promote one (docs/ha.md)"
    else:
        error = "no server of database.url could be reached"
    return PgTopology(mode=mode, hosts=hosts, error=error)


def _probe(params: dict[str, str], password: str | None, host: str, port: str) -> tuple[PgHost, tuple[PgStandby, ...]]:
    import psycopg2  # local: only PostgreSQL deployments have (and need) the driver
    from psycopg2.extensions import make_dsn

    addr = f"{host}:{port}"
    alone = {key: value for key, value in params.items() if key != "target_session_attrs"}
    alone.update(host=host, port=port, application_name="aios-ha-status")
    alone["connect_timeout"] = str(min(int(alone.get("connect_timeout") or CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S))
    if password:
        alone["password"] = password
    try:
        connection = psycopg2.connect(make_dsn(**alone))
    except Exception as exc:  # noqa: BLE001 - down, refusing, or unknown: the status says which
        return PgHost(addr=addr, reachable=False, error=_first_line(exc)), ()
    try:
        connection.autocommit = True  # one failed probe query must not poison the next
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery()")
            if (cursor.fetchone() or (False,))[0]:
                receiver, timeline = _standby_view(cursor)
                return PgHost(addr=addr, reachable=True, role="standby", timeline=timeline, receiver=receiver), ()
            timeline = _optional(cursor, _PRIMARY_TIMELINE)
            cursor.execute(_STANDBYS)
            standbys = tuple(PgStandby(*row) for row in cursor.fetchall())
            return PgHost(addr=addr, reachable=True, role="primary", timeline=timeline), standbys
    except Exception as exc:  # noqa: BLE001 - reached, but it could not answer (shutting down, no rights)
        return PgHost(addr=addr, reachable=True, error=_first_line(exc)), ()
    finally:
        connection.close()


#: A primary's timeline: the first 8 hex digits of the WAL file it writes now.
_PRIMARY_TIMELINE = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"

_STANDBYS = """
SELECT application_name, host(client_addr), state, sync_state,
       EXTRACT(epoch FROM write_lag)::float8, EXTRACT(epoch FROM flush_lag)::float8,
       EXTRACT(epoch FROM replay_lag)::float8,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint
FROM pg_stat_replication
ORDER BY application_name, client_addr
"""

_RECEIVER = """
SELECT status, sender_host || ':' || sender_port, received_tli
FROM pg_stat_wal_receiver
"""

_REPLAY = """
SELECT CASE WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::float8
            ELSE EXTRACT(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END,
       pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint
"""


def _standby_view(cursor: Any) -> tuple[PgReceiver, int | None]:
    cursor.execute(_RECEIVER)
    row = cursor.fetchone()
    status, sender, timeline = row if row else (None, None, None)
    cursor.execute(_REPLAY)
    replay_lag_s, lag_bytes = cursor.fetchone()
    if timeline is None:  # no receiver running: the control file knows (superuser or pg_monitor only)
        timeline = _optional(cursor, "SELECT timeline_id FROM pg_control_checkpoint()")
    return PgReceiver(status=status, sender=sender, replay_lag_s=replay_lag_s, lag_bytes=lag_bytes), timeline


def _optional(cursor: Any, sql: str) -> Any:
    """The first column of ``sql``'s row, or None where this role may not run it."""
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    except Exception:  # noqa: BLE001 - a missing right costs one field, not the status
        return None
    return row[0] if row else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:MAX_ERROR_CHARS]
