"""PostgreSQL streaming replication for tests: a primary, a synchronous standby, promotion, rejoin.

What an operator (or Patroni) does to a pair of servers, as named operations on :class:`PgNode`, so a
failover test reads as its runbook (docs/ha.md):

* :func:`create_primary`: ``initdb``, a replication role and ``pg_hba`` lines for the given networks,
  ``wal_level=replica``, ``wal_log_hints=on`` (what ``pg_rewind`` needs), ``synchronous_commit=on`` and
  ``synchronous_standby_names`` (a commit waits for the named standby: a 202 is on both sites);
* :func:`create_standby`: ``pg_basebackup -R`` from the primary under its own ``application_name``;
* :meth:`PgNode.promote` (``pg_ctl promote``), :meth:`PgNode.stop` (``fast`` or ``immediate``);
* :func:`rejoin_as_standby`: an old primary made a standby of the new one with ``pg_rewind``, as
  Patroni does (crash recovery first, in single-user mode so it never accepts a connection as primary).

PostgreSQL refuses to run as root, so as root every server command runs as the ``postgres`` OS user,
in a folder owned by it (made here; pytest's ``tmp_path`` is not readable by other users). Every command
takes an optional ``prefix`` (``["ip", "netns", "exec", "siteA"]``) so a node can live in a network
namespace. Authentication is ``trust`` for the given networks: these clusters are throwaway.

A pair across two namespaces, a site lost, and the old primary back as a standby::

    root = new_root()
    a = create_primary(root, "siteA", "10.0.1.2", 5432, networks=["10.0.0.0/16"],
                       synchronous_standby_names="siteB", prefix=["ip", "netns", "exec", "siteA"])
    b = create_standby(root, "siteB", "10.0.2.2", 5432, a, prefix=["ip", "netns", "exec", "siteB"])
    a.wait_streaming("siteB", sync=True)
    a.create_database("aios")            # replicated: exists on both (libpq needs it on every host)
    ...                                  # site A lost: kill its processes, cut its link
    a.stop("immediate"); b.promote()     # promote() also stops commits waiting for a lost standby
    rejoin_as_standby(a, b)              # later: pg_rewind, standby.signal, streaming from b
    b.set_synchronous("siteA")

Cut a link on the namespace's side (``ip link set <veth> down`` inside it) or with a DROP rule: with the
root namespace's end down, the address falls to the default route, and where that leads to a
transparent proxy (as on this project's build machine) the proxy answers: libpq, getting a reply that
is not PostgreSQL, gives up on the whole host list instead of trying the next host.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

#: The role standbys stream as.
REPLICATION_USER = "replicator"


def postgres_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` with a server in it, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def new_root(prefix: str = "aios-pgcluster-") -> Path:
    """A fresh folder for nodes, owned by the user the servers run as."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    return root


@dataclass
class PgNode:
    """One PostgreSQL server of a replicated pair: its data folder, address and how to run its commands."""

    name: str
    bindir: Path
    dir: Path
    host: str
    port: int
    prefix: list[str] = field(default_factory=list)
    #: ``fsync`` for the server: off saves time where no test crashes the machine.
    fsync: bool = False

    @property
    def data(self) -> Path:
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, database: str = "aios", user: str = "postgres") -> str:
        """A single-host SQLAlchemy URL for this node alone."""
        return f"postgresql+psycopg2://{user}@{self.host}:{self.port}/{database}"

    # ----------------------------------------------------------------- commands

    def run(
        self, argv: Sequence[str], *, timeout: float = 120.0, stdin: str | None = None, prefixed: bool = True
    ) -> str:
        """Run ``argv`` (a binary of :attr:`bindir` by name, or a path) as the server's user, prefixed
        (``prefixed`` False: in this namespace, for what needs no network, such as signalling the server)."""
        program = argv[0] if "/" in argv[0] else str(self.bindir / argv[0])
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        full = [*(self.prefix if prefixed else []), *as_user, program, *argv[1:]]
        result = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode != 0:
            raise AssertionError(
                f"{self.name}: {' '.join(full)} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
                f"{self.log_tail()}"
            )
        return result.stdout

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def sql(self, query: str, database: str = "postgres") -> str:
        """``psql -Atc query`` over this node's Unix socket (reachable even when its network link is cut)."""
        return self.run(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres"]
            + ["-d", database, "-c", query]
        ).strip()

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses={self.host} -c fsync={'on' if self.fsync else 'off'}"
        )
        self.run(["pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-o", options, "-w", "-t", "90", "start"])

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown that cuts open connections; ``immediate``: a crash (no checkpoint).
        (A signal to the pid in the data folder: no namespace needed.)"""
        self.run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "90", "stop"], prefixed=False)

    def is_running(self) -> bool:
        """``pg_ctl status`` (reads the pid file: works from any namespace, even one already deleted)."""
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        argv = [*as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"]
        return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0

    def promote(self, synchronous_standby_names: str = "") -> None:
        """``pg_ctl promote``, then name the standbys a commit waits for now: none by default, as Patroni's
        ``synchronous_mode`` does when no standby is left (else every commit would wait for one forever)."""
        self.run(["pg_ctl", "-D", str(self.data), "-w", "-t", "90", "promote"])
        self.set_synchronous(synchronous_standby_names)

    def set_synchronous(self, names: str) -> None:
        """``synchronous_standby_names`` (``''``: commits wait for no standby), applied with a reload."""
        self.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'")
        self.sql("SELECT pg_reload_conf()")

    def in_recovery(self) -> bool:
        return self.sql("SELECT pg_is_in_recovery()") == "t"

    def create_database(self, name: str = "aios") -> None:
        self.sql(f"CREATE DATABASE {name}")

    def wait_streaming(self, application_name: str, *, sync: bool, timeout: float = 60.0) -> None:
        """Wait until this primary's ``pg_stat_replication`` shows ``application_name`` streaming
        (and, with ``sync``, as the synchronous standby)."""
        wanted = "streaming|sync" if sync else "streaming"
        deadline = time.monotonic() + timeout
        while True:
            rows = self.sql(
                f"SELECT state || CASE WHEN sync_state = 'sync' THEN '|sync' ELSE '' END FROM pg_stat_replication "
                f"WHERE application_name = '{application_name}'"
            ).splitlines()
            if any(row == wanted or (not sync and row.startswith("streaming")) for row in rows):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{application_name} is not {wanted} from {self.name} after {timeout}s: {rows}")
            time.sleep(0.2)

    def destroy(self) -> None:
        """Stop at once (if running) and delete the data folder."""
        if self.data.exists() and self.is_running():
            try:
                self.stop("immediate")
            except (AssertionError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _node_dir(root: Path, name: str) -> Path:
    directory = root / name
    directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    return directory


def create_primary(
    root: Path,
    name: str,
    host: str,
    port: int,
    *,
    networks: Sequence[str] = ("127.0.0.1/32",),
    synchronous_standby_names: str = "",
    prefix: Sequence[str] = (),
    bindir: Path | None = None,
) -> PgNode:
    """A started primary at ``host:port`` that standbys (and clients) from ``networks`` may reach.

    With ``synchronous_standby_names``, a commit waits for that standby: write nothing until it streams."""
    bindir = bindir or postgres_bindir()
    assert bindir is not None, "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin"
    node = PgNode(name, bindir, _node_dir(root, name), host, port, list(prefix))
    node.run(["initdb", "-D", str(node.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
    settings = {
        "wal_level": "replica",
        "max_wal_senders": "10",
        "max_replication_slots": "10",
        "wal_keep_size": "'512MB'",  # a rejoining old primary finds the WAL it needs
        "wal_log_hints": "on",  # pg_rewind needs it (or data checksums)
        "hot_standby": "on",
        "synchronous_commit": "on",
        "max_connections": "200",
        "shared_buffers": "'32MB'",
        "log_line_prefix": "'%m [%p] %a '",
    }
    with (node.data / "postgresql.conf").open("a") as conf:
        conf.write("\n# tests.support.pg_cluster\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    with (node.data / "pg_hba.conf").open("a") as hba:
        for network in networks:
            hba.write(f"host all all {network} trust\nhost replication {REPLICATION_USER} {network} trust\n")
    node.start()
    node.sql(f"CREATE ROLE {REPLICATION_USER} WITH REPLICATION LOGIN")
    if synchronous_standby_names:  # from here on every commit waits for that standby
        node.set_synchronous(synchronous_standby_names)
    return node


def create_standby(
    root: Path,
    name: str,
    host: str,
    port: int,
    primary: PgNode,
    *,
    application_name: str | None = None,
    prefix: Sequence[str] = (),
) -> PgNode:
    """A started standby of ``primary`` (``pg_basebackup -R``), streaming as ``application_name`` (its name)."""
    node = PgNode(name, primary.bindir, _node_dir(root, name), host, port, list(prefix), fsync=primary.fsync)
    conninfo = _conninfo(primary, application_name or name)
    node.run(["pg_basebackup", "-d", conninfo, "-D", str(node.data), "-R", "-X", "stream", "-c", "fast", "--no-sync"])
    node.start()
    return node


def _conninfo(primary: PgNode, application_name: str) -> str:
    return f"host={primary.host} port={primary.port} user={REPLICATION_USER} application_name={application_name}"


def rejoin_as_standby(old: PgNode, new_primary: PgNode, *, application_name: str | None = None) -> None:
    """Make the stopped (or crashed) old primary ``old`` a started standby of ``new_primary``, as Patroni does.

    A server that did not shut down cleanly first runs crash recovery in single-user mode (it listens on
    no socket, so nothing can write to it as a primary); then ``pg_rewind`` winds its data back to where
    the timelines split and copies what changed from the new primary; ``standby.signal`` and a
    ``primary_conninfo`` naming the new primary make it start as a standby."""
    if old.is_running():
        old.stop("fast")
    state = old.run(["pg_controldata", "-D", str(old.data)])
    if "shut down" not in next((line for line in state.splitlines() if line.startswith("Database cluster state")), ""):
        old.run(["postgres", "--single", "-D", str(old.data), "-c", "fsync=off", "postgres"], stdin="")
    # A just-promoted server writes its new timeline to its control file only at its next checkpoint;
    # pg_rewind reads it from there (PostgreSQL's pg_rewind docs; Patroni runs this CHECKPOINT too).
    new_primary.sql("CHECKPOINT")
    source = f"host={new_primary.host} port={new_primary.port} user=postgres dbname=postgres"
    old.run(["pg_rewind", "-D", str(old.data), f"--source-server={source}", "--no-sync"])
    # pg_rewind copied the new primary's postgresql.auto.conf; the last setting of a name wins.
    conninfo = _conninfo(new_primary, application_name or old.name)
    with (old.data / "postgresql.auto.conf").open("a") as auto:
        auto.write(f"primary_conninfo = '{conninfo}'\nsynchronous_standby_names = ''\n")
    (old.data / "standby.signal").touch()
    if os.geteuid() == 0:
        for path in (old.data / "postgresql.auto.conf", old.data / "standby.signal"):
            shutil.chown(path, "postgres")
    old.start()


def require_postgres_server() -> Path:
    """The server binaries' folder; else the test skips (fails under CI) saying what is missing."""
    from tests.conftest import requirement_missing

    bindir = postgres_bindir()
    if bindir is None:
        requirement_missing("PostgreSQL server binaries (/usr/lib/postgresql/*/bin)", "not installed")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        requirement_missing("runuser", "PostgreSQL refuses to run as root, and runuser is not installed")
    return bindir


@contextmanager
def loopback_pair(database: str = "aios") -> Iterator[tuple[PgNode, PgNode]]:
    """``siteA`` primary and ``siteB`` its synchronous standby on free loopback ports, with ``database``
    made on the primary (it replicates); both destroyed on exit, whatever state they are in."""
    from tests.conftest import free_port

    require_postgres_server()
    root = new_root()
    nodes: list[PgNode] = []
    try:
        nodes.append(create_primary(root, "siteA", "127.0.0.1", free_port(), synchronous_standby_names="siteB"))
        nodes.append(create_standby(root, "siteB", "127.0.0.1", free_port(), nodes[0]))
        nodes[0].wait_streaming("siteB", sync=True)
        nodes[0].create_database(database)
        yield nodes[0], nodes[1]
    finally:
        for node in nodes:
            node.destroy()
        shutil.rmtree(root, ignore_errors=True)
