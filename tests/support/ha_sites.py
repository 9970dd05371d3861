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
Pure plumbing: no pytest here, so ``bench/ha_failover.py`` builds the same sites outside the tests.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

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

    def kill_all(self, timeout: float = 10.0) -> list[int]:
        """SIGKILL every process of the site (nothing gets to say goodbye) and wait until they are gone."""
        victims = self.pids()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        return victims

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
        "PYTHONUNBUFFERED": "1",
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


# --------------------------------------------------------------------------- PostgreSQL on the sites


def postgres_bindir() -> Path | None:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class SitePostgres:
    """One PostgreSQL cluster on one site (``initdb`` by the test, data under ``root``), listening on the
    site's address. Every cluster of the pair names itself after its site (``cluster_name``, which its WAL
    receiver sends as ``application_name``) and lists both names in ``synchronous_standby_names``, so
    whichever is primary waits for the other's flush: a commit (a ``202``) is on both sites."""

    def __init__(self, site: Site, peer: Site, bindir: Path, root: Path) -> None:
        self.site, self.peer, self.bindir = site, peer, bindir
        self.dir = root / f"pg-{site.label}"
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def run(self, *argv: str, timeout: float = 120.0) -> str:
        """A PostgreSQL program (in ``bindir``) run inside the site, as the cluster's owner."""
        command = [*self.site.prefix, *self.as_owner, str(self.bindir / argv[0]), *argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{' '.join(argv[:2])} on site {self.site.label}: {result.stdout}{result.stderr}\n{log}")
        return result.stdout

    def _make_dir(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import shutil

            for path in (self.dir.parent, self.dir):
                shutil.chown(path, "postgres")

    #: The same on both sites (``synchronous_standby_names`` is set by ALTER SYSTEM once a standby streams:
    #: :meth:`Pair.set_synchronous`), in postgresql.conf (``pg_rewind`` copies the peer's config files over a
    #: rejoining cluster, so what differs per site goes on the command line: :meth:`start`).
    SHARED_SETTINGS = (
        "wal_level = replica",
        "max_wal_senders = 10",
        "wal_keep_size = '256MB'",
        "wal_log_hints = on",  # pg_rewind needs it to rejoin a former primary
        "hot_standby = on",
        "synchronous_commit = on",
        "fsync = off",  # the machine itself never crashes in these tests; saves minutes of syncs
        "wal_receiver_timeout = '5s'",
        "wal_sender_timeout = '5s'",
    )

    def site_options(self) -> str:
        """Per-site settings (its address and its name, which its WAL receiver sends as application_name)."""
        return (
            f"-c listen_addresses={self.site.address} -c port={PG_PORT} "
            f"-c unix_socket_directories={self.dir} -c cluster_name=site{self.site.label}"
        )

    def init_primary(self, net: ipaddress.IPv4Network) -> None:
        self._make_dir()
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join([*self.SHARED_SETTINGS, ""]))
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {net} trust\nhost replication all {net} trust\n")

    def init_standby(self, net: ipaddress.IPv4Network) -> None:
        """A copy of the peer's cluster that streams from it (``pg_basebackup -R``)."""
        self._make_dir()
        self.run(
            "pg_basebackup", "-h", self.peer.address, "-p", str(PG_PORT), "-U", "postgres",
            "-D", str(self.data), "-R", "-X", "stream", "--no-sync", "--checkpoint=fast",
        )  # fmt: skip

    def start(self) -> None:
        self.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", self.site_options(),
            "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def promote(self) -> None:
        """What Patroni (or an operator) does on the standby: ``pg_ctl promote``, waiting for it to take writes."""
        self.run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")

    def rejoin(self) -> None:
        """A former primary (stopped, cleanly or not) becomes a standby of the peer: ``pg_rewind`` (which runs
        crash recovery first when the server died) with ``-R`` writes the standby's recovery settings."""
        self.run(
            "pg_rewind", "-D", str(self.data), "-R",
            "--source-server", self.peer_conninfo(),
        )  # fmt: skip
        # Whether or not a rewind was needed: a standby of the peer (written last, so it wins over what the
        # copied postgresql.auto.conf says).
        (self.data / "standby.signal").touch()
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(f"primary_conninfo = '{self.peer_conninfo()}'\n")
        self.start()

    def peer_conninfo(self) -> str:
        return f"host={self.peer.address} port={PG_PORT} user=postgres dbname=postgres"

    def conninfo(self, dbname: str = "aios") -> str:
        return f"postgresql+psycopg2://postgres@{self.site.address}:{PG_PORT}/{dbname}"

    def is_in_recovery(self) -> bool:
        return self.query("SELECT pg_is_in_recovery()") is True

    def query(self, sql: str, dbname: str = "postgres") -> object:
        import sqlalchemy as sa

        engine = sa.create_engine(
            self.conninfo(dbname), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
        )
        try:
            with engine.connect() as connection:
                result = connection.execute(sa.text(sql))
                return result.scalar() if result.returns_rows else None
        finally:
            engine.dispose()


# --------------------------------------------------------------------------- Redis and Sentinel on the sites


class SiteRedis:
    """A ``redis-server`` (no persistence) or a Sentinel on one site, config file in ``dir``."""

    def __init__(self, site: Site, port: int, root: Path, *, sentinel: bool = False) -> None:
        self.site, self.port, self.sentinel = site, port, sentinel
        kind = "sentinel" if sentinel else "redis"
        self.dir = root / f"{kind}-{site.label}-{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / f"{kind}.conf"
        self.log_path = self.dir / f"{kind}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def configure(self, lines: list[str]) -> None:
        base = [f"port {self.port}", f"bind {self.site.address}", "protected-mode no", f"dir {self.dir}"]
        if not self.sentinel:
            base += ['save ""', "appendonly no"]
        self.conf.write_text("\n".join([*base, *lines, ""]))

    def start(self, timeout: float = 15.0) -> None:
        import redis

        argv = ["redis-server", str(self.conf), *(["--sentinel"] if self.sentinel else [])]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*self.site.prefix, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis(self.site.address, self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{argv} on site {self.site.label}: {self.log_path.read_text()[-2000:]}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def client(self) -> object:
        import redis

        return redis.Redis(
            self.site.address, self.port, socket_connect_timeout=2, socket_timeout=5, decode_responses=True
        )


# --------------------------------------------------------------------------- the pair


@dataclass
class Pair:
    """Two sites with everything on them: PostgreSQL (A primary, B synchronous standby), Redis (A master,
    B replica) and three Sentinels (A: 1, B: 2; quorum 2), and AIOS (API, agent, beat) on each site with
    the same settings. The fault operations are the operator's (or Patroni's) moves, named."""

    sites: Sites
    root: Path
    env: dict[str, str]
    queue: str
    pg: dict[str, SitePostgres]
    redis: dict[str, SiteRedis]
    sentinels: list[SiteRedis]
    aios: dict[str, SiteAios] = field(default_factory=dict)
    #: The site whose PostgreSQL takes writes (the primary), as the operator set it.
    pg_primary: str = "a"
    a_lost: bool = False

    # ------------------------------------------------------------------ reading the pair

    @property
    def url(self) -> str:
        return database_url(self.sites)

    def redis_master(self) -> tuple[str, int]:
        """The master as most Sentinels still up see it (a Sentinel just restarted may still name the
        master it knew before it died, until its peers' hellos reach it)."""
        from collections import Counter

        views: Counter[tuple[str, int]] = Counter()
        for sentinel in self.sentinels:
            if sentinel.process is None or sentinel.process.poll() is not None:
                continue
            with contextlib.suppress(Exception):
                host, port = sentinel.client().sentinel_get_master_addr_by_name(SENTINEL_MASTER)  # type: ignore[attr-defined]
                views[(str(host), int(port))] += 1
        if not views:
            raise RuntimeError("no Sentinel answers")
        return views.most_common(1)[0][0]

    def redis_master_site(self) -> str:
        host, _ = self.redis_master()
        return next(site.label for site in self.sites.all if site.address == host)

    # ------------------------------------------------------------------ PostgreSQL moves

    def set_synchronous(self, label: str, on: bool) -> None:
        """On primary ``label``: wait for the other site's flush (on), or not (off: the peer is gone;
        Patroni's non-strict ``synchronous_mode`` does the same rather than stop all writes)."""
        names = "ANY 1 (sitea, siteb)" if on else ""
        pg = self.pg[label]
        pg.query(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        pg.query("SELECT pg_reload_conf()")

    def switchover(self) -> None:
        """Planned: stop the primary (fast: its WAL is streamed to the standby before it exits), promote
        the standby, rejoin the old primary as its standby (``pg_rewind``), then synchronous again."""
        old, new = self.pg_primary, self.other(self.pg_primary)
        self.pg[old].stop("fast")
        self.promote(new)
        self.pg[old].rejoin()
        self.set_synchronous(new, True)

    def promote(self, label: str) -> None:
        """Promote ``label``'s standby and let it commit alone until a standby rejoins."""
        self.pg[label].promote()
        self.pg_primary = label
        self.set_synchronous(label, False)

    @staticmethod
    def other(label: str) -> str:
        return "b" if label == "a" else "a"

    # ------------------------------------------------------------------ Redis moves

    def kill_redis_master(self) -> str:
        """SIGKILL the Redis master (its site otherwise untouched); returns its site."""
        label = self.redis_master_site()
        self.redis[label].kill()
        return label

    def restart_redis_as_replica(self, label: str) -> None:
        """The lost master comes back empty, as a replica of the current master (what Sentinel would
        order it to be anyway)."""
        host, port = self.redis_master()
        server = self.redis[label]
        server.configure([f"replicaof {host} {port}"])
        server.start()

    def redis_failover_to(self, label: str, timeout: float = 60.0) -> None:
        """A planned Sentinel failover (``SENTINEL FAILOVER``) until ``label`` holds the master."""
        deadline = time.monotonic() + timeout
        while self.redis_master_site() != label:
            with contextlib.suppress(Exception):
                self.sentinels[-1].client().execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis master still on {self.redis_master()} after {timeout}s")
            time.sleep(2)
        self.wait_redis_synced(timeout=deadline - time.monotonic() + 30)

    def wait_redis_synced(self, timeout: float = 60.0) -> None:
        """Until the master has its replica connected and in sync (link up)."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                master = self.redis[self.redis_master_site()]
                info = master.client().info("replication")  # type: ignore[attr-defined]
                if info.get("role") == "master" and info.get("connected_slaves", 0) >= 1:
                    replica = self.redis[self.other(master.site.label)].client().info("replication")  # type: ignore[attr-defined]
                    if replica.get("master_link_status") == "up":
                        return
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis replica did not sync with its master")
            time.sleep(0.2)

    # ------------------------------------------------------------------ whole-site moves

    def lose_site_a(self) -> list[int]:
        """Site A is lost: every process on it SIGKILLed (PostgreSQL, Redis, its Sentinel, AIOS) and its
        link cut. Returns the pids killed. Promotion is the caller's (Patroni's) next move."""
        victims = self.sites.a.kill_all()
        self.sites.a.cut()
        self.a_lost = True
        return victims

    def bring_back_site_a(self) -> None:
        """The old primary site returns as Patroni would bring it: link up, PostgreSQL rewound and started as
        a standby of B (never as a primary), Redis as a replica of B's master, its Sentinel, its AIOS."""
        self.sites.a.restore()
        self.pg["a"].rejoin()
        self.set_synchronous(self.pg_primary, True)
        self.restart_redis_as_replica("a")
        self.sentinels[0].start()
        self.aios["a"] = start_aios(self.sites.a, self.env, self.root / "logs", self.queue)
        wait_aios_ready(self.aios["a"])
        self.wait_redis_synced()
        self.a_lost = False

    def stop(self) -> None:
        for aios in self.aios.values():
            aios.stop()
        for pg in self.pg.values():
            with contextlib.suppress(Exception):
                pg.stop("immediate")
        for server in [*self.redis.values(), *self.sentinels]:
            server.kill()


def start_pair(sites: Sites, root: Path, base_env: dict[str, str], queue: str, *, with_aios: bool = True) -> Pair:
    """Build and start everything on ``sites`` (PostgreSQL, migrated; Redis and Sentinels; AIOS on both)."""
    bindir = postgres_bindir()
    if bindir is None:
        raise SitesUnavailable("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
    root.mkdir(parents=True, exist_ok=True)
    a, b = sites.a, sites.b
    pg = {"a": SitePostgres(a, b, bindir, root), "b": SitePostgres(b, a, bindir, root)}
    redis_servers = {"a": SiteRedis(a, REDIS_PORT, root), "b": SiteRedis(b, REDIS_PORT, root)}
    on_site = {site.address: site for site in sites.all}
    sentinels = [SiteRedis(on_site[host], port, root, sentinel=True) for host, port in sentinel_ports(sites)]
    pair = Pair(sites, root, aios_env(sites, base_env), queue, pg, redis_servers, sentinels)
    try:
        pg["a"].init_primary(sites.net)
        pg["a"].start()
        pg["a"].query("CREATE DATABASE aios")
        pg["b"].init_standby(sites.net)
        pg["b"].start()
        pair.set_synchronous("a", True)  # only now: with no standby yet, every commit would wait
        redis_servers["a"].configure([])
        redis_servers["a"].start()
        redis_servers["b"].configure([f"replicaof {a.address} {REDIS_PORT}"])
        redis_servers["b"].start()
        for sentinel in sentinels:
            sentinel.configure(
                [
                    f"sentinel monitor {SENTINEL_MASTER} {a.address} {REDIS_PORT} 2",
                    f"sentinel down-after-milliseconds {SENTINEL_MASTER} 2000",
                    f"sentinel failover-timeout {SENTINEL_MASTER} 10000",
                    f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
                ]
            )
            sentinel.start()
        pair.wait_redis_synced()
        from aios import migrate
        from aios.config import DatabaseSettings

        migrate.upgrade(DatabaseSettings(url=pg["a"].conninfo()))
        if not with_aios:
            return pair
        pair.aios = {site.label: start_aios(site, pair.env, root / "logs", queue) for site in sites.all}
        for aios in pair.aios.values():
            wait_aios_ready(aios)
    except BaseException:
        pair.stop()
        raise
    return pair
