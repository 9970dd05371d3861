"""A private Redis master, its replicas and three Sentinels, for tests that fail Redis over.

Every server is a ``redis-server`` of its own (``redis-server <conf> --sentinel`` is the Sentinel: the
machine has no ``redis-sentinel``), with a config file and data folder under the test's temp folder,
so Sentinel can rewrite the files as it reconfigures the servers and a server restarted after a
failover keeps the role Sentinel gave it. Each server's command may be prefixed (``["ip", "netns",
"exec", "siteA"]``) to run it inside a network namespace; ``ip netns exec`` execs the server, so the
pid the test holds is the server's own.

Timings are short (a master silent for ``down_after_ms`` is down; a failover that stalls is retried
after ``failover_timeout_ms``) so a failover takes seconds, not minutes. No persistence: a killed master
comes back empty, and Sentinel turns it into a replica of the new master.
"""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port, require_program, wait_for

#: The name the Sentinels watch the master under (``broker.sentinel_master``).
MASTER_NAME = "aios"


@dataclass(frozen=True)
class Node:
    """Where one server listens, and what runs its command (empty: this namespace)."""

    host: str
    port: int
    prefix: tuple[str, ...] = ()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Server:
    """One running (or stopped) ``redis-server``, data node or Sentinel."""

    name: str
    node: Node
    conf: Path
    log_path: Path
    sentinel: bool
    password: str | None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, f"{self.name} already running"
        command = [*self.node.prefix, "redis-server", str(self.conf), *(["--sentinel"] if self.sentinel else [])]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def client(self, timeout_s: float = 1.0) -> Any:
        import redis

        return redis.Redis(
            self.node.host,
            self.node.port,
            password=self.password,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
        )

    def answers(self) -> bool:
        import redis

        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-2000:]}")
        client = self.client(0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a word (a crash, a host lost)."""
        self.signal(signal.SIGKILL)

    def stop(self) -> None:
        self.signal(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class SentinelGroup:
    """A master, its replicas and the Sentinels that watch them (see the module docstring)."""

    data: list[Server]
    sentinels: list[Server]
    master_name: str = MASTER_NAME
    password: str | None = None
    sentinel_password: str | None = None
    quorum: int = 2
    started: list[Server] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The broker URL in kombu's Sentinel form (the master's password, if any, on the first part)."""
        auth = f":{self.password}@" if self.password else ""
        first, *rest = self.sentinels
        return ";".join([f"sentinel://{auth}{first.node.addr}/0", *(f"sentinel://{s.node.addr}" for s in rest)])

    def env(self) -> dict[str, str]:
        """The AIOS settings for this group, as environment variables."""
        env = {"AIOS_BROKER__URL": self.url, "AIOS_BROKER__SENTINEL_MASTER": self.master_name}
        if self.sentinel_password:
            env["AIOS_BROKER__SENTINEL_PASSWORD"] = self.sentinel_password
        return env

    def server(self, addr: str) -> Server:
        return next(s for s in self.data if s.node.addr == addr)

    def named_masters(self) -> list[str | None]:
        """What each running Sentinel names as the master ("host:port"; None if it cannot be asked)."""
        import redis

        named: list[str | None] = []
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = sentinel.client()
            try:
                address = client.sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                address = None
            finally:
                client.close()
            named.append(f"{address[0]}:{address[1]}" if address else None)
        return named

    def master_addr(self) -> str | None:
        """The master most reachable Sentinels name right now (None if none answers)."""
        named = Counter(addr for addr in self.named_masters() if addr)
        return named.most_common(1)[0][0] if named else None

    def master(self) -> Server:
        addr = self.master_addr()
        assert addr is not None, "no Sentinel names a master"
        return self.server(addr)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every Sentinel names the same master, knows every replica (as up) and every other Sentinel:
        a failover needs all three, and a test that fails Redis over before them would hang."""
        import redis

        replicas = len(self.data) - 1

        def ready() -> bool:
            masters = set()
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    state = client.sentinel_master(self.master_name)
                    known = client.sentinel_slaves(self.master_name)
                except redis.RedisError:
                    return False
                finally:
                    client.close()
                up = [r for r in known if not (r.get("is_sdown") or r.get("is_odown"))]
                if state.get("num-other-sentinels") != len(self.sentinels) - 1 or len(up) < replicas:
                    return False
                if state.get("is_sdown") or state.get("is_odown"):
                    return False
                masters.add(f"{state['ip']}:{state['port']}")
            return len(masters) == 1 and self._replicating(masters.pop())

        wait_for(ready, timeout=timeout, interval=0.2, what="the Sentinels to agree on the master and its replicas")

    def _replicating(self, master: str) -> bool:
        """Whether ``master`` says it is the master and every other running server is its replica with its
        link up. A restarted old master comes back as a master (empty) until Sentinel reconfigures it,
        which may take Sentinel up to 10 s: until then Sentinel may count it as a replica, and a
        failover could promote it."""
        import redis

        for server in self.data:
            if not server.running:
                continue
            client = server.client()
            try:
                info = client.info("replication")
            except redis.RedisError:
                return False
            finally:
                client.close()
            if server.node.addr == master:
                if info.get("role") != "master":
                    return False
            elif info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
            elif f"{info.get('master_host')}:{info.get('master_port')}" != master:
                return False
        return True

    def wait_master_is_not(self, old: str, timeout: float = 60.0) -> Server:
        """Until every running Sentinel names a master other than ``old`` and that server says it is the
        master (promoted and writable); returns it."""
        import redis

        def moved() -> Server | None:
            if any(addr is None or addr == old for addr in self.named_masters()):
                return None
            new = self.master()
            client = new.client()
            try:
                return new if client.info("replication").get("role") == "master" else None
            except redis.RedisError:
                return None
            finally:
                client.close()

        return wait_for(moved, timeout=timeout, interval=0.2, what=f"Sentinel to elect a master other than {old}")

    def failover(self, timeout: float = 60.0) -> tuple[Server, Server]:
        """A planned failover (``SENTINEL FAILOVER``): a replica is promoted, then the old master demoted.
        Returns (old master, new master) once the old master replicates from the new one.

        Between the two steps both servers are masters: Redis 7.0's Sentinel reconfigures the old one
        only when it next looks at it, up to 10 s later, and writes made there meanwhile (by clients
        still connected to it) are lost when it resyncs from the new master."""
        old = self.master()
        client = next(s for s in self.sentinels if s.running).client()
        try:
            client.sentinel_failover(self.master_name)
        finally:
            client.close()
        new = self.wait_master_is_not(old.node.addr, timeout)
        self.wait_ready(timeout)
        return old, new

    def kill_master(self, timeout: float = 60.0) -> tuple[Server, Server]:
        """The master dies (SIGKILL); Sentinel elects a replica. Returns (old master, new master)."""
        old = self.master()
        old.kill()
        return old, self.wait_master_is_not(old.node.addr, timeout)

    def close(self) -> None:
        for server in [*self.sentinels, *self.data]:
            if server.running:
                server.kill()


def _data_conf(node: Node, folder: Path, password: str | None, replica_of: Node | None) -> str:
    lines = [
        f"port {node.port}",
        f"bind {node.host}",
        "protected-mode no",
        f"dir {folder}",
        'save ""',
        "appendonly no",
        "daemonize no",
        # Full syncs straight over the socket: faster, and nothing here is persisted anyway.
        "repl-diskless-sync yes",
        "repl-diskless-sync-delay 0",
    ]
    if password:
        lines += [f"requirepass {password}", f"masterauth {password}"]
    if replica_of is not None:
        lines.append(f"replicaof {replica_of.host} {replica_of.port}")
    return "\n".join(lines) + "\n"


def _sentinel_conf(
    node: Node,
    folder: Path,
    master: Node,
    *,
    name: str,
    quorum: int,
    down_after_ms: int,
    failover_timeout_ms: int,
    password: str | None,
    sentinel_password: str | None,
) -> str:
    lines = [
        f"port {node.port}",
        f"bind {node.host}",
        "protected-mode no",
        f"dir {folder}",
        "daemonize no",
        f"sentinel monitor {name} {master.host} {master.port} {quorum}",
        f"sentinel down-after-milliseconds {name} {down_after_ms}",
        f"sentinel failover-timeout {name} {failover_timeout_ms}",
        f"sentinel parallel-syncs {name} 1",
    ]
    if password:
        lines.append(f"sentinel auth-pass {name} {password}")
    if sentinel_password:
        # The Sentinels' own password, which they also use to talk to each other.
        lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
    return "\n".join(lines) + "\n"


def start_sentinel_group(
    root: Path,
    master: Node,
    replicas: Sequence[Node],
    sentinels: Sequence[Node],
    *,
    name: str = MASTER_NAME,
    quorum: int = 2,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 5000,
    password: str | None = None,
    sentinel_password: str | None = None,
    ready_timeout: float = 60.0,
) -> SentinelGroup:
    """Write the configs under ``root``, start every server, and wait until the Sentinels are ready to
    fail the master over (:meth:`SentinelGroup.wait_ready`). On failure everything started is killed."""
    require_program("redis-server", "apt-get install redis-server")
    data: list[Server] = []
    for index, node in enumerate([master, *replicas]):
        folder = root / f"redis-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "redis.conf"
        conf.write_text(_data_conf(node, folder, password, None if index == 0 else master))
        data.append(Server(f"redis-{index} ({node.addr})", node, conf, folder / "log", False, password))
    watchers: list[Server] = []
    for index, node in enumerate(sentinels):
        folder = root / f"sentinel-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        conf.write_text(
            _sentinel_conf(
                node,
                folder,
                master,
                name=name,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                password=password,
                sentinel_password=sentinel_password,
            )
        )
        watchers.append(Server(f"sentinel-{index} ({node.addr})", node, conf, folder / "log", True, sentinel_password))
    group = SentinelGroup(data, watchers, name, password, sentinel_password, quorum)
    try:
        for server in data:
            server.start()
            wait_for(server.answers, timeout=15, interval=0.05, what=f"{server.name} to answer")
        for server in watchers:
            server.start()
            wait_for(server.answers, timeout=15, interval=0.05, what=f"{server.name} to answer")
        group.wait_ready(ready_timeout)
    except Exception:
        logs = "\n".join(f"--- {s.name}:\n{s.log()[-1500:]}" for s in [*data, *watchers])
        group.close()
        raise AssertionError(f"the Sentinel group did not start:\n{logs}") from None
    return group


@contextmanager
def running_sentinel_group(root: Path, replicas: int = 1, **options: Any) -> Iterator[SentinelGroup]:
    """A master, ``replicas`` replicas and three Sentinels on free loopback ports; killed on exit."""
    nodes = [Node("127.0.0.1", free_port()) for _ in range(1 + replicas + 3)]
    group = start_sentinel_group(root, nodes[0], nodes[1 : 1 + replicas], nodes[1 + replicas :], **options)
    try:
        yield group
    finally:
        group.close()
