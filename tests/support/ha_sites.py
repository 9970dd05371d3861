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
