"""Every Redis client AIOS opens, from the broker settings: one place that knows plain URLs and Sentinel.

A ``redis://`` or ``rediss://`` URL names the server; a ``sentinel://h1:26379;sentinel://h2:26379`` URL
(kombu's form) names the Sentinels, and ``broker.sentinel_master`` the master they watch. Through
Sentinel, a client is redis-py's :meth:`redis.sentinel.Sentinel.master_for`: its connections ask the
Sentinels for the master's address each time they connect, and an idle connection to an address that is
no longer the master is dropped. A command that meets the old master (refused connection, or a READONLY
reply from a demoted master) fails once with a ``ConnectionError`` and the next connection goes to the
new master, so nothing here caches an address and no process needs a restart after a failover. Callers
already treat a ``RedisError`` as a broker outage (fail open, or 503), which covers that one failure.

The master's password, user, database and TLS options are written as for ``redis://``: in the URL (kombu
reads them from the first ``sentinel://`` part; :func:`kombu_url` copies them to every part, because
kombu re-reads them from whichever part it moves on to after a connection error). The Sentinels' own
password is ``broker.sentinel_password``; they are reached with the same TLS options as the master.

:func:`redis_topology` reports what Sentinel (or the single server) says about the master, its
replicas and their lag, for ``aios ha status``.
"""

from __future__ import annotations

import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

from kombu.utils.url import parse_url

from aios.config import BrokerSettings

if TYPE_CHECKING:
    import redis

#: Seconds a Sentinel (and, for :func:`redis_topology`, a server) has to answer.
SENTINEL_TIMEOUT_S = 1.0

Result = TypeVar("Result")

_CERT_REQS = {ssl.CERT_NONE: "none", ssl.CERT_OPTIONAL: "optional", ssl.CERT_REQUIRED: "required"}


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``sentinel://`` URL says: the Sentinels, and how to reach the master they name."""

    sentinels: list[tuple[str, int]]
    username: str | None
    password: str | None
    db: int
    #: redis-py's ``ssl_*`` keyword arguments (``ssl_cert_reqs`` as its name); empty = no TLS.
    tls: dict[str, Any]


def sentinel_target(url: str) -> SentinelTarget:
    """Parse kombu's Sentinel form. Credentials, database and ``ssl_*`` options come from the first part
    that has them (kombu reads the first), so they need to be written only once."""
    sentinels: list[tuple[str, int]] = []
    first: dict[str, Any] = {}
    for part in url.split(";"):
        parsed = parse_url(part)
        sentinels.append((parsed["hostname"] or "127.0.0.1", int(parsed["port"] or 26379)))
        for key in ("userid", "password", "virtual_host", "ssl"):
            if parsed.get(key) and key not in first:
                first[key] = parsed[key]
    tls = {key: _CERT_REQS.get(value, value) for key, value in (first.get("ssl") or {}).items()}
    db = str(first.get("virtual_host") or "0").strip("/") or "0"
    return SentinelTarget(sentinels, first.get("userid"), first.get("password"), int(db), tls)


def kombu_url(broker: BrokerSettings) -> str:
    """The broker URL as kombu should get it: a Sentinel URL with the first part's credentials, database
    and query on every part. kombu moves to the next ``;`` part after a connection error and then reads
    the password and TLS options from that part alone: a part without them would reach the master
    without password or TLS (kombu ``Connection.switch``)."""
    if not broker.is_sentinel:
        return broker.url
    parts = broker.url.split(";")
    donor = next((urlsplit(part) for part in parts if "@" in part or "?" in part), None)
    if donor is None:
        return broker.url
    userinfo = donor.netloc.rpartition("@")[0]
    completed = []
    for part in parts:
        split = urlsplit(part)
        hostport = split.netloc.rpartition("@")[2]
        netloc = f"{userinfo}@{hostport}" if userinfo and "@" not in split.netloc else split.netloc
        path = split.path if split.path.strip("/") else donor.path
        query = split.query or donor.query
        completed.append(f"sentinel://{netloc}{path}{'?' + query if query else ''}")
    return ";".join(completed)


def sentinel_kwargs(broker: BrokerSettings, timeout_s: float = SENTINEL_TIMEOUT_S) -> dict[str, Any]:
    """How to reach the Sentinels themselves (kombu's ``sentinel_kwargs`` transport option): their own
    password, the master's TLS options, and a short timeout so a dead Sentinel costs little."""
    target = sentinel_target(broker.url)
    options: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if broker.sentinel_password:
        options["password"] = broker.sentinel_password
    if target.tls:
        options.update(ssl=True, **target.tls)
    return options


def redis_client(broker: BrokerSettings, **overrides: Any) -> redis.Redis:
    """A client on the configured Redis: the URL's server, or through Sentinel the current master.

    ``overrides`` are redis-py connection options (``socket_timeout=1``...). A Sentinel client follows a
    failover by itself (module docstring); keep one per process and reuse it.
    """
    import redis
    from redis.sentinel import Sentinel

    if not broker.is_sentinel:
        return redis.Redis.from_url(broker.url, **overrides)
    target = sentinel_target(broker.url)
    timeout = overrides.get("socket_connect_timeout") or SENTINEL_TIMEOUT_S
    sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs(broker, timeout))
    options: dict[str, Any] = {"db": target.db, **overrides}
    if target.username:
        options["username"] = target.username
    if target.password:
        options["password"] = target.password
    if target.tls:
        options.update(ssl=True, **target.tls)
    client: redis.Redis = sentinel.master_for(broker.sentinel_master, redis_class=redis.Redis, **options)
    return client


def read_twice(read: Callable[[], Result]) -> Result:
    """Run a read-only Redis call, and once more if it meets a dead connection.

    For clients on kombu's connection pool (queue depths, the sync job's look at the queues): kombu
    opens its connections without redis-py's retry, so after a failover (or a Redis restart) the first
    command on a pooled connection to the old master fails. That failure drops the connection, and the
    second try opens a new one, to the current master. Writes are not repeated this way: whether the
    first one took effect is unknown."""
    import redis

    try:
        return read()
    except redis.ConnectionError:
        return read()


# --- topology, for `aios ha status` -------------------------------------------------------------


@dataclass(frozen=True)
class RedisReplica:
    addr: str
    #: The master's word on it (``online``, ``wait_bgsave``, ...), or Sentinel's flags when the master
    #: cannot be asked.
    state: str
    #: Sentinel's ``master-link-status`` of the replica (``ok``/``err``), None without Sentinel.
    link: str | None
    offset: int | None
    #: Bytes of the master's replication stream the replica has not confirmed (master offset - offset).
    lag_bytes: int | None


@dataclass(frozen=True)
class RedisSentinel:
    addr: str
    reachable: bool
    #: The master this Sentinel names ("host:port"), None if it names none or cannot be asked.
    master: str | None
    error: str | None = None


@dataclass(frozen=True)
class RedisTopology:
    mode: Literal["single", "sentinel", "embedded"]
    master: str | None
    replicas: list[RedisReplica] = field(default_factory=list)
    sentinels: list[RedisSentinel] = field(default_factory=list)
    #: Sentinels that must agree the master is down before a failover (None without Sentinel).
    quorum: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _addr(host: Any, port: Any) -> str:
    host = host.decode() if isinstance(host, bytes) else str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _replication(client: Any) -> tuple[int | None, list[RedisReplica]]:
    """The master offset and the replicas from a server's ``INFO replication``."""
    info = client.info("replication")
    master_offset = info.get("master_repl_offset")
    replicas = []
    for index in range(int(info.get("connected_slaves", 0))):
        entry = info.get(f"slave{index}")
        if not isinstance(entry, dict):
            continue
        offset = int(entry["offset"]) if "offset" in entry else None
        lag = master_offset - offset if master_offset is not None and offset is not None else None
        replicas.append(RedisReplica(_addr(entry["ip"], entry["port"]), str(entry.get("state")), None, offset, lag))
    return master_offset, replicas


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _single_topology(broker: BrokerSettings) -> RedisTopology:
    import redis

    client = redis.Redis.from_url(
        broker.url, socket_timeout=SENTINEL_TIMEOUT_S, socket_connect_timeout=SENTINEL_TIMEOUT_S
    )
    pool_args = client.connection_pool.connection_kwargs
    master = _addr(pool_args.get("host", "localhost"), pool_args.get("port", 6379)) if "path" not in pool_args else None
    try:
        _, replicas = _replication(client)
    except redis.RedisError as exc:
        return RedisTopology("single", master, error=_describe(exc))
    finally:
        client.close()
    return RedisTopology("single", master, replicas)


def _ask_sentinel(client: Any, name: str) -> tuple[str | None, dict[str, Any], list[dict[str, Any]]]:
    address = client.sentinel_get_master_addr_by_name(name)
    master = _addr(*address) if address else None
    state = client.sentinel_master(name)
    replicas = client.sentinel_slaves(name)
    return master, state, replicas


def _sentinel_topology(broker: BrokerSettings) -> RedisTopology:
    import redis

    target = sentinel_target(broker.url)
    options = sentinel_kwargs(broker)
    sentinels: list[RedisSentinel] = []
    quorum: int | None = None
    seen_replicas: list[dict[str, Any]] = []
    for host, port in target.sentinels:
        client = redis.Redis(host, port, **options)
        try:
            master, state, known = _ask_sentinel(client, broker.sentinel_master)
        except redis.RedisError as exc:
            sentinels.append(RedisSentinel(_addr(host, port), False, None, _describe(exc)))
            continue
        finally:
            client.close()
        sentinels.append(RedisSentinel(_addr(host, port), True, master))
        if quorum is None and state:
            quorum = int(state.get("quorum", 0)) or None
        if not seen_replicas:
            seen_replicas = known
    named = Counter(sentinel.master for sentinel in sentinels if sentinel.master)
    if not named:
        missing = "no Sentinel answered with a master for " + repr(broker.sentinel_master)
        return RedisTopology("sentinel", None, [], sentinels, quorum, missing)
    master, _ = named.most_common(1)[0]
    error: str | None = None if len(named) == 1 else "the Sentinels name different masters (a failover is under way?)"
    links = {_addr(entry["ip"], entry["port"]): entry for entry in seen_replicas}
    asked = _replicas_of(broker, master, links)
    if isinstance(asked, str):
        error = error or asked
        asked = []
    # Replicas Sentinel knows but the master does not list (down, or not yet connected), as Sentinel sees them.
    listed = {replica.addr for replica in asked}
    asked += [_seen_by_sentinel(addr, entry) for addr, entry in links.items() if addr not in listed]
    return RedisTopology("sentinel", master, asked, sentinels, quorum, error)


def _seen_by_sentinel(addr: str, entry: dict[str, Any]) -> RedisReplica:
    flags = entry.get("flags")
    state = ",".join(sorted(flags)) if isinstance(flags, (set, list, tuple)) else str(flags or "unknown")
    offset = entry.get("slave-repl-offset")
    return RedisReplica(addr, state, entry.get("master-link-status"), int(offset) if offset is not None else None, None)


def _replicas_of(broker: BrokerSettings, master: str, links: dict[str, dict[str, Any]]) -> list[RedisReplica] | str:
    """The master's own view of its replicas, with Sentinel's link status; a string says why not."""
    import redis

    target = sentinel_target(broker.url)
    host, _, port = master.rpartition(":")
    options: dict[str, Any] = {"db": target.db, "username": target.username, "password": target.password}
    if target.tls:
        options.update(ssl=True, **target.tls)
    client = redis.Redis(
        host.strip("[]"),
        int(port),
        socket_timeout=SENTINEL_TIMEOUT_S,
        socket_connect_timeout=SENTINEL_TIMEOUT_S,
        **options,
    )
    try:
        _, replicas = _replication(client)
    except redis.RedisError as exc:
        return f"master {master} did not answer: {_describe(exc)}"
    finally:
        client.close()
    return [
        RedisReplica(r.addr, r.state, (links.get(r.addr) or {}).get("master-link-status"), r.offset, r.lag_bytes)
        for r in replicas
    ]


def redis_topology(broker: BrokerSettings) -> RedisTopology:
    """The Redis side of ``aios ha status``. Never raises for an unreachable server: ``error`` says it."""
    if broker.is_embedded:
        return RedisTopology("embedded", None)
    try:
        if broker.is_sentinel:
            return _sentinel_topology(broker)
        return _single_topology(broker)
    except Exception as exc:  # noqa: BLE001 - a status report shows what went wrong, it never fails
        return RedisTopology("sentinel" if broker.is_sentinel else "single", None, error=_describe(exc))
