"""One cgroup per command, so its limits hold for all of its processes together and it dies whole.

RLIMITs count per process: five children may each use the memory limit, three busy ones the CPU
limit three times over, and a child that calls ``setsid`` leaves the process group the agent kills.
A cgroup holds every process the command starts, whatever it does with sessions and groups:

* **cgroup v2** (``/sys/fs/cgroup`` of type cgroup2, the usual layout today): ``memory.max`` (with
  ``memory.swap.max`` 0 and ``memory.oom.group`` 1), ``pids.max``, CPU time from ``cpu.stat``, and
  ``cgroup.kill``. The memory and pids limits need those controllers enabled for the group's parent
  (``cgroup.subtree_control``); the agent enables them when the kernel lets it, and records which
  limits the group enforces.
* **v1 / hybrid** (controllers mounted one by one under ``/sys/fs/cgroup/<controller>``, maybe a
  controller-less cgroup2 at ``/sys/fs/cgroup/unified``): ``memory.limit_in_bytes`` (and
  ``memory.memsw.limit_in_bytes``), ``pids.max``, CPU time from ``cpuacct.usage``; kill and CPU time
  from the cgroup2 group when there is one.

Each group is made below the agent's **own** cgroup in every hierarchy (``/proc/self/cgroup``), so a
command never leaves the limits its agent runs under. The first process joins every group itself,
between fork and exec (:meth:`CommandGroup.join`), so nothing it starts runs outside. Where no group
can be made (not root, no cgroupfs, a read-only mount), :func:`create` returns None and the caller
falls back to RLIMITs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: The v1 controllers a command group uses.
V1_CONTROLLERS = ("memory", "pids", "cpuacct")
#: The leaf a cgroup v2 agent moves itself into, so its group may enable controllers for commands.
AGENT_LEAF = "aios-agent"
#: How long a killed group may take to empty before its directories are given up on.
EMPTY_WAIT_S = 5.0


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: where it is mounted, which part of it the mount shows, its controllers."""

    mount: str
    root: str
    version: int
    controllers: frozenset[str] = frozenset()


def hierarchies(mountinfo: str) -> list[Hierarchy]:
    """The cgroup mounts in a ``/proc/self/mountinfo`` text (fields: see proc(5))."""
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        if fstype == "cgroup2":
            found.append(Hierarchy(mount=fields[4], root=fields[3], version=2))
        elif fstype == "cgroup":
            found.append(
                Hierarchy(
                    mount=fields[4],
                    root=fields[3],
                    version=1,
                    controllers=frozenset(o for o in options if o in V1_CONTROLLERS),
                )
            )
    return found


def own_groups(proc_cgroup: str) -> dict[str, str]:
    """This process's group per hierarchy from ``/proc/self/cgroup``: ``""`` keys the cgroup2 one,
    each v1 controller keys its own."""
    groups: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            groups[""] = path
        for controller in controllers.split(","):
            if controller in V1_CONTROLLERS:
                groups[controller] = path
    return groups


def _inside(hierarchy: Hierarchy, group: str) -> str | None:
    """The directory of ``group`` under ``hierarchy``'s mount; None if the mount does not show it."""
    root = hierarchy.root.rstrip("/")
    if root and group != root and not group.startswith(root + "/"):
        return None
    return str(Path(hierarchy.mount) / group[len(root) :].lstrip("/"))


@dataclass(frozen=True)
class Layout:
    """Where command groups go: the agent's own group in the cgroup2 hierarchy and in each v1 one."""

    unified: str | None = None
    v1: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.unified is not None or bool(self.v1)


def layout(mountinfo: str, proc_cgroup: str) -> Layout:
    """The parents of command groups on this machine (pure: give it the two /proc files' text).

    An agent that moved itself into its leaf (:func:`prepare_agent_group`) puts them beside that leaf.
    """
    own = own_groups(proc_cgroup)
    unified: str | None = None
    v1: dict[str, str] = {}
    for hierarchy in hierarchies(mountinfo):
        if hierarchy.version == 2 and "" in own and unified is None:
            unified = _inside(hierarchy, own[""])
            if unified is not None and Path(unified).name == AGENT_LEAF:
                unified = str(Path(unified).parent)
        for controller in hierarchy.controllers:
            if controller in own and controller not in v1:
                directory = _inside(hierarchy, own[controller])
                if directory is not None:
                    v1[controller] = directory
    return Layout(unified=unified, v1=v1)


def system_layout() -> Layout:
    try:
        return layout(Path("/proc/self/mountinfo").read_text(), Path("/proc/self/cgroup").read_text())
    except OSError:
        return Layout()


def _write(path: Path, value: str) -> bool:
    try:
        path.write_text(value)
    except OSError as exc:
        logger.debug("cgroup: could not write %r to %s: %s", value, path, exc)
        return False
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _keyed(text: str, key: str) -> int:
    """The value of ``key`` in a ``key value`` per line file (cpu.stat, memory.events, memory.oom_control)."""
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            with contextlib.suppress(ValueError):
                return int(value)
    return 0


def prepare_agent_group(where: Layout | None = None, *, pid: int | None = None) -> bool:
    """cgroup v2: let command groups get memory and pids limits. Returns whether they can.

    cgroup v2 enables a controller for a group's children only if the group holds no process itself
    (unless it is the root). An agent alone in its group — a systemd service with ``Delegate=yes``,
    a container whose only process it is — moves itself into a leaf ``aios-agent`` of that group
    and enables the controllers there, before it starts its pool. A group shared with other
    processes is left as it is (their memory and pids limits then stay RLIMITs).
    """
    where = system_layout() if where is None else where
    if where.unified is None:
        return False
    own = Path(where.unified)
    wanted = tuple(c for c in ("memory", "pids") if c in _read(own / "cgroup.controllers").split())
    if not wanted:
        return False  # e.g. a controller-less cgroup2 beside v1 controllers: nothing to enable
    if set(_enable_v2(own, wanted)) == set(wanted):
        return True
    pid = os.getpid() if pid is None else pid
    members = [p for p in _read(own / "cgroup.procs").split() if p.isdigit()]
    if members != [str(pid)]:
        logger.info(
            "cgroup %s holds other processes than this agent: commands get no memory/pids "
            "limit from their cgroups (RLIMITs instead)",
            own,
        )
        return False
    leaf = own / AGENT_LEAF
    try:
        leaf.mkdir(exist_ok=True)
    except OSError:
        return False
    if not _write(leaf / "cgroup.procs", str(pid)):
        return False
    return set(_enable_v2(own, wanted)) == set(wanted)


def group_name(pid: int) -> str:
    """A new command group's name: the agent process that runs the command, and a random part."""
    return f"aios-cmd-{pid}-{uuid.uuid4().hex[:12]}"


_GROUP_NAME = re.compile(r"^aios-cmd-(\d+)-[0-9a-f]{12}$")


def reap_orphan_groups(where: Layout | None = None) -> int:
    """Kill and remove the command groups of agent processes that no longer exist; returns how many.

    A pool process killed hard (SIGKILL, the OOM killer) cannot clean up: its command's processes
    run on in their group. The next agent to start on the host ends them.
    """
    where = system_layout() if where is None else where
    orphans: dict[str, list[Path]] = {}
    for parent in [where.unified, *where.v1.values()]:
        if parent is None or not Path(parent).is_dir():
            continue
        for directory in Path(parent).iterdir():
            match = _GROUP_NAME.match(directory.name)
            if match and directory.is_dir() and not Path(f"/proc/{match.group(1)}").exists():
                orphans.setdefault(directory.name, []).append(directory)
    for name, dirs in orphans.items():
        unified = next((d for d in dirs if where.unified and d.parent == Path(where.unified)), None)
        logger.warning("killing the processes left in command group %s (its agent process is gone)", name)
        CommandGroup(version=2, dirs=dirs, unified=unified, memory=None, cpuacct=None, enforces=frozenset()).remove()
    return len(orphans)


def _enable_v2(parent: Path, wanted: tuple[str, ...]) -> set[str]:
    """Controllers of ``wanted`` that ``parent``'s children get, enabling those the kernel allows."""
    available = set(_read(parent / "cgroup.controllers").split())
    enabled = set(_read(parent / "cgroup.subtree_control").split())
    for controller in wanted:
        if (
            controller in available
            and controller not in enabled
            and _write(parent / "cgroup.subtree_control", f"+{controller}")
        ):
            enabled.add(controller)
    return enabled & set(wanted)


@dataclass
class CommandGroup:
    """The directories of one command's group (one per hierarchy used) and what they enforce."""

    version: int
    dirs: list[Path]
    unified: Path | None
    memory: Path | None
    cpuacct: Path | None
    #: Which of memory, pids and cpu the group enforces (the others fall back to RLIMITs).
    enforces: frozenset[str]

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def join(self) -> None:
        """Move the calling process into every directory of the group. Runs between fork and exec,
        before the process drops to the command user (moving needs the agent's rights)."""
        pid = str(os.getpid()).encode()
        for path in self.procs_files():
            descriptor = os.open(path, os.O_WRONLY)
            try:
                os.write(descriptor, pid)
            finally:
                os.close(descriptor)

    def cpu_s(self) -> float | None:
        """CPU time used by every process of the group so far, living or dead; None if not accounted."""
        stat = _read(self.unified / "cpu.stat") if self.unified is not None else ""
        if stat:
            return _keyed(stat, "usage_usec") / 1e6
        if self.cpuacct is not None:
            text = _read(self.cpuacct / "cpuacct.usage").strip()
            return int(text) / 1e9 if text.isdigit() else None
        return None

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the group for its memory limit."""
        if self.memory is None:
            return False
        if self.memory == self.unified:
            return _keyed(_read(self.memory / "memory.events"), "oom_kill") > 0
        return _keyed(_read(self.memory / "memory.oom_control"), "oom_kill") > 0

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            found.update(int(p) for p in _read(directory / "cgroup.procs").split() if p.isdigit())
        return found

    def signal(self, number: int) -> None:
        """Send ``number`` to every process of the group, whatever session or process group it is in."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, number)

    def kill(self) -> None:
        """SIGKILL the whole group: ``cgroup.kill`` where the kernel has it (no race with forks), else
        SIGKILL every member until none is left."""
        if self.unified is not None and _write(self.unified / "cgroup.kill", "1"):
            return
        for _ in range(100):
            if not self.pids():
                return
            self.signal(signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left, wait for the group to empty, then remove its directories (best effort)."""
        self.kill()
        deadline = time.monotonic() + EMPTY_WAIT_S
        while self.pids() and time.monotonic() < deadline:
            self.signal(signal.SIGKILL)
            time.sleep(0.02)
        for directory in self.dirs:
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if time.monotonic() >= deadline:
                        logger.warning("cgroup %s could not be removed: %s", directory, exc)
                        break
                    time.sleep(0.02)


def create(name: str, *, memory_bytes: int, pids: int, where: Layout | None = None) -> CommandGroup | None:
    """Make the group ``name`` with its memory and pids limits; None where no group can be made."""
    where = system_layout() if where is None else where
    made: list[Path] = []

    def make(parent: str) -> Path | None:
        directory = Path(parent) / name
        try:
            directory.mkdir()
        except OSError as exc:
            logger.debug("cgroup: cannot make %s: %s", directory, exc)
            return None
        made.append(directory)
        return directory

    enforces: set[str] = set()
    unified = memory = cpuacct = None
    v1_used = False
    if where.unified is not None:
        enabled = _enable_v2(Path(where.unified), ("memory", "pids"))
        unified = make(where.unified)
        if unified is not None:
            enforces.add("cpu")  # cpu.stat is there with or without the cpu controller
            if "memory" in enabled and _write(unified / "memory.max", str(memory_bytes)):
                memory = unified
                enforces.add("memory")
                _write(unified / "memory.swap.max", "0")
                _write(unified / "memory.oom.group", "1")
            if "pids" in enabled and _write(unified / "pids.max", str(pids)):
                enforces.add("pids")
    if "memory" not in enforces and "memory" in where.v1:
        directory = make(where.v1["memory"])
        if directory is not None and _write(directory / "memory.limit_in_bytes", str(memory_bytes)):
            _write(directory / "memory.memsw.limit_in_bytes", str(memory_bytes))
            memory, v1_used = directory, True
            enforces.add("memory")
    if "pids" not in enforces and "pids" in where.v1:
        directory = make(where.v1["pids"])
        if directory is not None and _write(directory / "pids.max", str(pids)):
            enforces.add("pids")
            v1_used = True
    if unified is None and "cpuacct" in where.v1:
        cpuacct = make(where.v1["cpuacct"])
        if cpuacct is not None:
            enforces.add("cpu")
            v1_used = True
    if not made:
        return None
    version = 1 if v1_used else 2
    return CommandGroup(
        version=version, dirs=made, unified=unified, memory=memory, cpuacct=cpuacct, enforces=frozenset(enforces)
    )


@contextlib.contextmanager
def command_group(name: str, *, memory_bytes: int, pids: int, enabled: bool = True) -> Iterator[CommandGroup | None]:
    """A group for the length of a ``with`` block, killed and removed at its end (None: no group)."""
    group = create(name, memory_bytes=memory_bytes, pids=pids) if enabled else None
    try:
        yield group
    finally:
        if group is not None:
            group.remove()
