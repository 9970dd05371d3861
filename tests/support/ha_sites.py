"""Two sites on one machine: each a network namespace with an address of its own, joined by a bridge.

The HA scenarios (issue 18) need two "machines" that can lose each other: site A and site B are
network namespaces, each linked by a veth pair to a bridge in the root namespace, where the test
process lives and reaches both (``10.X.0.1`` is A, ``10.X.0.2`` is B, ``10.X.0.254`` the root; ``X``
is picked per run among the free ``10.x.0.0/24`` nets). Cutting a site sets the bridge end of its veth
down: its packets are dropped, nobody gets a reset, connections just stall — as when a data centre's
uplink dies. Every server and AIOS process of a site is started with :meth:`Site.prefix`
(``ip netns exec NS``), so "site A is lost" is: SIGKILL every process in A's namespace, cut its link.

Names carry a per-run tag and a marker file that names the owning pid, so a run that died before its
teardown (SIGKILL, power loss) leaves nothing the next run does not remove (:func:`remove_leftovers`).
No pytest fixtures here, so ``bench/ha_failover.py`` builds the same pair outside the tests. PostgreSQL
and Redis come from :mod:`tests.support.pg_cluster` and :mod:`tests.support.redis_sentinel`, each
command prefixed with its site's ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.conftest import HttpSubmitter
from tests.support.pg_cluster import (
    PgNode,
    create_primary,
    create_standby,
    new_root,
    postgres_bindir,
    rejoin_as_standby,
)
from tests.support.redis_sentinel import Node, SentinelGroup, Server, start_sentinel_group

#: Prefix of every namespace and interface these sites create (leftovers are found by it).
NAME_PREFIX = "aiosha"
#: Where each live run notes its pid, so leftovers of dead runs can be told from a parallel run's sites.
MARKERS = Path("/tmp/aios-ha-sites")


class SitesUnavailable(RuntimeError):
    """The kernel or the container refused a namespace, a bridge or a veth pair (the reason is the text)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)
    except subprocess.CalledProcessError as exc:
        raise SitesUnavailable(f"ip {' '.join(args)}: {exc.stderr.strip() or exc}") from exc


@dataclass
class Site:
    """One site: a namespace, its veth pair (``bridge_end`` in the root namespace), its address."""

    label: str
    netns: str
    bridge_end: str
    address: str

    @property
    def prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this site."""
        return ["ip", "netns", "exec", self.netns]

    def pids(self) -> list[int]:
        """Every process in this site's namespace (servers, AIOS processes, their children)."""
        listed = ip("netns", "pids", self.netns, check=False).stdout.split()
        return [int(pid) for pid in listed if pid.isdigit()]

    def kill_all(self, timeout: float = 30.0) -> list[int]:
        """SIGKILL every process of the site (nothing gets to say goodbye) and wait until they are gone,
        reaped too: a server's pid file names a zombie as alive, and ``pg_ctl`` would believe it."""
        import psutil

        victims = []
        for pid in self.pids():
            with contextlib.suppress(psutil.NoSuchProcess):
                victims.append(psutil.Process(pid))
        for process in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(victims, timeout=timeout)
        return [process.pid for process in victims]

    def cut(self) -> None:
        """The site's link goes down: its packets are dropped (no reset), both ways."""
        ip("link", "set", self.bridge_end, "down")

    def restore(self) -> None:
        ip("link", "set", self.bridge_end, "up")


@dataclass
class Sites:
    """Site A and site B joined by a bridge that the root namespace also sits on."""

    tag: str
    net: ipaddress.IPv4Network
    bridge: str
    a: Site
    b: Site
    created: list[str] = field(default_factory=list)

    @property
    def root_address(self) -> str:
        return str(self.net[254])

    @property
    def all(self) -> tuple[Site, Site]:
        return (self.a, self.b)

    def teardown(self) -> None:
        """Kill every process of both sites, then remove the namespaces, the veths and the bridge.
        Safe to call twice and after a partial :func:`create_sites`."""
        for site in self.all:
            if site.netns in self.created:
                site.kill_all()
        for site in self.all:
            ip("link", "del", site.bridge_end, check=False)
            ip("netns", "del", site.netns, check=False)
        ip("link", "del", self.bridge, check=False)
        (MARKERS / self.tag).unlink(missing_ok=True)


def _free_net() -> ipaddress.IPv4Network:
    """A ``10.x.0.0/24`` that no route of this machine (or a parallel run) uses."""
    routes = ip("-4", "route", "show", "table", "all", check=False).stdout
    used = {
        ipaddress.ip_network(word, strict=False)
        for line in routes.splitlines()
        for word in line.split()[:1]
        if "/" in word or word.count(".") == 3
    }
    candidates = list(range(100, 200))
    random.shuffle(candidates)
    for x in candidates:
        net = ipaddress.ip_network(f"10.{x}.0.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise SitesUnavailable("no free 10.x.0.0/24 for the two sites")


def remove_leftovers() -> list[str]:
    """Remove the sites of earlier runs whose process is dead (a killed test run); returns their tags."""
    removed: list[str] = []
    if not MARKERS.exists():
        return removed
    for marker in MARKERS.iterdir():
        try:
            pid = int(marker.read_text().strip())
            os.kill(pid, 0)
            continue  # that run is alive (a parallel session): its sites are not ours to remove
        except (ValueError, ProcessLookupError, PermissionError):
            pass
        tag = marker.name
        sites = _named(tag, ipaddress.ip_network("10.0.0.0/24"))
        sites.created = [sites.a.netns, sites.b.netns]
        sites.teardown()
        removed.append(tag)
    return removed


def _named(tag: str, net: ipaddress.IPv4Network) -> Sites:
    def site(label: str, host: int) -> Site:
        return Site(label, f"{NAME_PREFIX}{label}{tag}", f"{NAME_PREFIX[:3]}{label}{tag}", str(net[host]))

    return Sites(tag=tag, net=net, bridge=f"{NAME_PREFIX}br{tag}", a=site("a", 1), b=site("b", 2))


def create_sites() -> Sites:
    """Two fresh sites (raises :class:`SitesUnavailable`, with nothing left behind, where the kernel refuses)."""
    remove_leftovers()
    MARKERS.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    (MARKERS / tag).write_text(str(os.getpid()))
    sites = _named(tag, _free_net())
    try:
        ip("link", "add", sites.bridge, "type", "bridge")
        ip("addr", "add", f"{sites.root_address}/24", "dev", sites.bridge)
        ip("link", "set", sites.bridge, "up")
        for site in sites.all:
            ip("netns", "add", site.netns)
            sites.created.append(site.netns)
            inner = f"eth{site.label}{tag}"
            ip("link", "add", site.bridge_end, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", site.netns)
            ip("link", "set", site.bridge_end, "master", sites.bridge)
            ip("link", "set", site.bridge_end, "up")
            for args in (
                ["addr", "add", f"{site.address}/24", "dev", inner],
                ["link", "set", inner, "up"],
                ["link", "set", "lo", "up"],
            ):
                ip("netns", "exec", site.netns, "ip", *args)
    except BaseException:
        sites.teardown()
        raise
    return sites


@contextlib.contextmanager
def two_sites() -> Iterator[Sites]:
    """:func:`create_sites`, always torn down on exit."""
    sites = create_sites()
    try:
        yield sites
    finally:
        sites.teardown()


# --------------------------------------------------------------------------- AIOS on a site


#: The fixed ports of the services on each site (each site has a network stack of its own).
PG_PORT = 5432
REDIS_PORT = 6379
API_PORT = 8000
#: The Sentinels: one on site A, two on site B (quorum 2: site B alone still has a majority).
SENTINEL_MASTER = "aios"


def sentinel_ports(sites: Sites) -> list[tuple[str, int]]:
    return [(sites.a.address, 26379), (sites.b.address, 26379), (sites.b.address, 26380)]


def database_url(sites: Sites, dbname: str = "aios") -> str:
    """The multi-host URL both sites use (docs/ha.md's form): libpq tries A, then B, and keeps the one
    that takes writes."""
    return (
        f"postgresql+psycopg2://postgres@/{dbname}?host={sites.a.address}:{PG_PORT}"
        f"&host={sites.b.address}:{PG_PORT}&target_session_attrs=read-write"
    )


def broker_url(sites: Sites) -> str:
    """The Sentinel URL both sites use (docs/ha.md's form)."""
    return ";".join(f"sentinel://{host}:{port}" for host, port in sentinel_ports(sites))


def aios_env(sites: Sites, base_env: dict[str, str]) -> dict[str, str]:
    """``base_env`` (a session's settings) pointed at the pair: the same on both sites."""
    return {
        **base_env,
        "AIOS_DATABASE__URL": database_url(sites),
        "AIOS_BROKER__URL": broker_url(sites),
        "AIOS_BROKER__SENTINEL_MASTER": SENTINEL_MASTER,
    }


@dataclass
class SiteProcess:
    """One AIOS process (``api``, ``worker`` or ``beat``) running inside a site."""

    site: Site
    role: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to its process group (gunicorn's and the pool's children too)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class SiteAios:
    """A site's AIOS: an API (gunicorn, one worker) on the site's address, an agent, a beat."""

    site: Site
    api: SiteProcess
    worker: SiteProcess
    beat: SiteProcess

    @property
    def url(self) -> str:
        return f"http://{self.site.address}:{API_PORT}"

    @property
    def hostname(self) -> str:
        return f"agent-{self.site.label}@{self.site.netns}"

    @property
    def processes(self) -> list[SiteProcess]:
        return [self.api, self.worker, self.beat]

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


def start_aios(site: Site, env: dict[str, str], logs: Path, queue: str, *, concurrency: int = 2) -> SiteAios:
    """Start a site's API, agent (on ``queue``) and beat; returns at once (see :func:`wait_aios_ready`)."""
    logs.mkdir(parents=True, exist_ok=True)
    env = {
        **env,
        "AIOS_API__HOST": site.address,
        "AIOS_API__PORT": str(API_PORT),
        "AIOS_API__WORKERS": "1",
        "AIOS_METRICS__MULTIPROC_DIR": str(logs / f"prometheus-{site.label}"),
        "AIOS_LOGGING__DIR": str(logs / f"aios-{site.label}"),
        "PYTHONUNBUFFERED": "1",
        "AIOS_LOGGING__LEVEL": "INFO",  # the agent's " ready." line (INFO) is how start-up is awaited
    }
    import sys

    hostname = f"agent-{site.label}@{site.netns}"
    commands = {
        "api": ["api"],
        "worker": ["worker", "--name", hostname, "--queues", queue, "--concurrency", str(concurrency)],
        "beat": ["beat"],
    }
    started: dict[str, SiteProcess] = {}
    for role, args in commands.items():
        log_path = logs / f"{role}-{site.label}.log"
        with log_path.open("ab") as handle:
            process = subprocess.Popen(
                [*site.prefix, sys.executable, "-m", "aios.cli", *args],
                env=env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=str(Path(__file__).resolve().parents[2]),
                start_new_session=True,
            )
        started[role] = SiteProcess(site, role, process, log_path)
    return SiteAios(site, started["api"], started["worker"], started["beat"])


def wait_aios_ready(aios: SiteAios, timeout: float = 120.0) -> None:
    """Until the API answers /healthz and the agent logs `` ready.``; a process that exits fails it."""
    import requests

    deadline = time.monotonic() + timeout
    api_up = worker_up = False
    while not (api_up and worker_up):
        for process in aios.processes:
            if not process.alive:
                raise RuntimeError(
                    f"{process.role} on site {aios.site.label} exited with {process.process.returncode}:\n"
                    f"{process.log()[-3000:]}"
                )
        if not api_up:
            with contextlib.suppress(requests.RequestException):
                api_up = requests.get(f"{aios.url}/healthz", timeout=1).status_code == 200
        worker_up = worker_up or " ready." in aios.worker.log()
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"site {aios.site.label}'s AIOS not ready after {timeout}s (api {api_up}, agent {worker_up}):\n"
                f"{aios.api.log()[-2000:]}\n{aios.worker.log()[-2000:]}"
            )
        time.sleep(0.2)


# --------------------------------------------------------------------------- the pair


def site_name(label: str) -> str:
    """A site's PostgreSQL name, which its WAL receiver sends as ``application_name``."""
    return f"site{label}"


@dataclass
class Pair:
    """Two sites with everything on them: PostgreSQL (A primary, B synchronous standby; :mod:`pg_cluster`),
    Redis (A master, B replica) and three Sentinels (A: 1, B: 2; quorum 2; :mod:`redis_sentinel`), and AIOS
    (API, agent, beat) on each site with the same settings. The fault operations are the operator's (or
    Patroni's) moves, named, so a scenario reads as its runbook (docs/ha.md)."""

    sites: Sites
    root: Path
    env: dict[str, str]
    queue: str
    pg: dict[str, PgNode]
    redis: SentinelGroup
    aios: dict[str, SiteAios] = field(default_factory=dict)
    #: The site whose PostgreSQL takes writes, as the operator set it.
    pg_primary: str = "a"
    a_lost: bool = False
    #: Seconds a fault cost, as measured by the scenario that caused it (printed; the bench reports them).
    times: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The multi-host URL every AIOS process of the pair uses."""
        return database_url(self.sites)

    @staticmethod
    def other(label: str) -> str:
        return "b" if label == "a" else "a"

    def redis_master_site(self) -> str:
        """The site of the Redis master most Sentinels name."""
        host = self.redis.master().node.host
        return next(site.label for site in self.sites.all if site.address == host)

    def redis_on(self, label: str) -> Server:
        site = self.sites.a if label == "a" else self.sites.b
        return next(server for server in self.redis.data if server.node.host == site.address)

    def redis_failover_to(self, label: str, attempts: int = 8) -> None:
        """Planned Sentinel failovers (``SENTINEL FAILOVER``) until ``label`` holds the master. Sentinel
        answers ``NOGOODSLAVE`` while its view of a just-resynced replica is stale (it asks replicas for
        ``INFO`` every 10 s), and aborts a failover whose promoted replica does not answer as a master
        within ``failover-timeout`` (``-failover-abort-slave-timeout``, seen on a loaded machine); it
        retries neither by itself, so this does, a few seconds apart."""
        import redis

        for attempt in range(attempts):
            if self.redis_master_site() == label:
                return
            try:
                self.redis.wait_ready(90)
                self.redis.failover(timeout=30)
            except (AssertionError, redis.RedisError):
                if attempt == attempts - 1:
                    raise
                time.sleep(3)
        assert self.redis_master_site() == label, f"the Redis master is not on site {label}"

    # ------------------------------------------------------------------ PostgreSQL moves

    def promote(self, label: str) -> None:
        """What Patroni does to the standby when the primary is gone: promote it, and let it commit alone
        (no synchronous standby left; Patroni's non-strict ``synchronous_mode``) until one rejoins."""
        self.pg[label].promote("")
        self.pg_primary = label

    def rejoin(self, label: str) -> None:
        """The old primary ``label`` (stopped or crashed) becomes a standby of the current primary with
        ``pg_rewind``; then the primary waits for its flush again (synchronous)."""
        primary = self.pg[self.pg_primary]
        rejoin_as_standby(self.pg[label], primary, application_name=site_name(label))
        primary.wait_streaming(site_name(label), sync=False)
        primary.set_synchronous(site_name(label))
        primary.wait_streaming(site_name(label), sync=True)

    def switchover(self) -> None:
        """Planned: stop the primary (fast: it streams all its WAL to the standby before it exits), promote
        the standby, rejoin the old primary as the new one's synchronous standby."""
        old = self.pg_primary
        self.pg[old].stop("fast")
        self.promote(self.other(old))
        self.rejoin(old)

    # ------------------------------------------------------------------ whole-site moves

    def lose_site_a(self) -> list[int]:
        """Site A is lost: every process on it SIGKILLed (PostgreSQL, Redis, its Sentinel, AIOS) and its
        link cut. Returns the pids killed. Promoting B is the caller's (Patroni's) next move."""
        victims = self.sites.a.kill_all()
        self.sites.a.cut()
        self.a_lost = True
        return victims

    def bring_back_site_a(self) -> None:
        """The old primary site returns as Patroni would bring it: link up, PostgreSQL rewound and started as
        a standby of B (never as a primary), Redis (empty: Sentinel makes it a replica of B's master), its
        Sentinel and its AIOS."""
        self.sites.a.restore()
        self.rejoin("a")
        for server in [*self.redis.data, *self.redis.sentinels]:
            if server.node.host == self.sites.a.address and not server.running:
                server.start()
        self.redis.wait_ready(90)
        self.aios["a"] = start_aios(self.sites.a, self.env, self.root / "logs", self.queue)
        wait_aios_ready(self.aios["a"])
        self.a_lost = False

    def stop(self) -> None:
        for aios in self.aios.values():
            aios.stop()
        self.redis.close()
        for node in self.pg.values():
            node.destroy()
        for root in {node.dir.parent for node in self.pg.values()}:  # the pair's own new_root()
            shutil.rmtree(root, ignore_errors=True)


def start_pair(sites: Sites, root: Path, base_env: dict[str, str], queue: str, *, with_aios: bool = True) -> Pair:
    """Build and start everything on ``sites``: PostgreSQL (migrated), Redis and the Sentinels, and, with
    ``with_aios``, AIOS on both sites (ready)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise SitesUnavailable("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
    a, b = sites.a, sites.b
    pg_root = new_root("aios-ha-pg-")
    pg: dict[str, PgNode] = {}
    redis: SentinelGroup | None = None
    pair: Pair | None = None
    try:
        pg["a"] = create_primary(
            pg_root, site_name("a"), a.address, PG_PORT, networks=[str(sites.net)], prefix=a.prefix, bindir=bindir
        )
        pg["a"].create_database("aios")
        pg["b"] = create_standby(pg_root, site_name("b"), b.address, PG_PORT, pg["a"], prefix=b.prefix)
        pg["a"].wait_streaming(site_name("b"), sync=False)
        pg["a"].set_synchronous(site_name("b"))  # from here on a commit is on both sites
        pg["a"].wait_streaming(site_name("b"), sync=True)
        redis = start_sentinel_group(
            root / "redis",
            Node(a.address, REDIS_PORT, tuple(a.prefix)),
            [Node(b.address, REDIS_PORT, tuple(b.prefix))],
            [
                Node(host, port, tuple(site.prefix))
                for (host, port), site in zip(sentinel_ports(sites), (a, b, b), strict=True)
            ],
            name=SENTINEL_MASTER,
            quorum=2,
        )
        pair = Pair(sites, root, aios_env(sites, base_env), queue, pg, redis)
        from aios import migrate
        from aios.config import DatabaseSettings

        migrate.upgrade(DatabaseSettings(url=pg["a"].url()))
        if with_aios:
            pair.aios = {site.label: start_aios(site, pair.env, root / "logs", queue) for site in sites.all}
            for aios in pair.aios.values():
                wait_aios_ready(aios)
    except BaseException:
        if pair is not None:
            pair.stop()
        else:
            if redis is not None:
                redis.close()
            for node in pg.values():
                node.destroy()
        raise
    return pair


# --------------------------------------------------------------------------- load and the times a fault costs


def timed_submitter(url: str, key: str, effects: object, queue: str, interval_s: float = 0.3) -> HttpSubmitter:
    """An :class:`~tests.faults.conftest.HttpSubmitter` to ``url`` that also notes when each ``202`` came
    (``accepted_at``: ``(sent, answered, task id)``, ``time.time()``s), so a scenario can tell when a site
    took writes again: counted by requests sent after the fault (one in flight may be answered after it)."""

    class Timed(HttpSubmitter):
        accepted_at: list[tuple[float, float, str]] = []

        def post(self, body: dict[str, object]) -> tuple[int | str, object]:
            sent = time.time()
            status, answer = super().post(body)
            if status == 202 and isinstance(answer, dict):
                self.accepted_at.append((sent, time.time(), str(answer["id"])))
            return status, answer

    submitter = Timed(url, key, effects, queue, interval_s=interval_s)
    submitter.accepted_at = []
    return submitter


def longest_write_gap(submitter: HttpSubmitter, since: float) -> float:
    """The longest time (s) after ``since`` between two ``202``s of a :func:`timed_submitter` (or between
    ``since`` and its first one): how long that API stopped taking writes."""
    answered = (at for sent, at, _ in submitter.accepted_at if sent > since)  # type: ignore[attr-defined]
    times = [since, *sorted(answered)]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def first_write_after(submitter: HttpSubmitter, since: float) -> float | None:
    """When the first request sent after ``since`` was answered ``202`` (``time.time()``), or None."""
    return min((at for sent, at, _ in submitter.accepted_at if sent > since), default=None)  # type: ignore[attr-defined]


def first_run_after(database: object, since: float, agent: str) -> float | None:
    """When (``time.time()``) ``agent`` first started a run after ``since``: its claim's ``RUNNING`` event.
    (By agent: a claim on the lost site stamped just before the kill may commit after it.)"""
    import datetime

    from sqlalchemy import func, select

    from aios.db import session_scope
    from aios.models import TaskEvent

    moment = datetime.datetime.fromtimestamp(since, datetime.UTC)
    with session_scope(database) as session:  # type: ignore[arg-type]
        first = session.scalar(
            select(func.min(TaskEvent.at)).where(
                TaskEvent.to_state == "RUNNING", TaskEvent.at > moment, TaskEvent.actor == f"worker:{agent}"
            )
        )
    return first.timestamp() if first is not None else None
