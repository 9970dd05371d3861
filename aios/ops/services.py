"""``aios up --detach`` / ``down`` / ``restart`` / ``ps`` / ``logs``: ``aios up`` as a background service.

A detached ``aios up`` is the same supervisor as the foreground one (:mod:`aios.ops.supervisor`), started
in a session of its own with its output in ``logs/up.log`` and each child's in ``logs/<name>.log``. It
leaves two files so the other commands can find it without guessing from process names:

- the **pid file** (default ``var/aios-up.pid``, ``--pid-file`` / ``AIOS_UP_PID_FILE``): the supervisor's
  pid, one line, so ``kill $(cat var/aios-up.pid)`` works too. The supervisor holds an exclusive
  ``flock`` on it for its whole life: a second ``aios up`` with the same pid file is refused, whatever
  state the file is in.
- the **state file** beside it (``var/aios-up.json``): the supervisor's and each child's pid *and start
  time*, the API URL and the agent name. A pid alone is not an identity (pids are reused), so a process
  counts as ours only if its start time matches too.

A pid file whose supervisor is gone (SIGKILL, a reboot) is *stale*: every command detects it, ``ps``
reports it, and ``up``/``down`` remove it after making sure the children it recorded are gone too
(they get SIGTERM from the kernel when the supervisor dies, ``PR_SET_PDEATHSIG``; whatever is left
after the grace period is killed with its process tree).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

#: Where the pid file and the logs go unless told otherwise (relative to the working directory, the
#: project folder, like the embedded default's ``var/aios.db``).
DEFAULT_PID_FILE = "var/aios-up.pid"
DEFAULT_LOG_DIR = "logs"
PID_FILE_ENV = "AIOS_UP_PID_FILE"
LOG_DIR_ENV = "AIOS_UP_LOG_DIR"
#: The children of ``aios up``, in start order; each logs to ``<log dir>/<name>.log`` when detached.
CHILD_NAMES = ("api", "agent", "beat")
#: The supervisor's own log when detached.
SUPERVISOR_LOG = "up"
#: Seconds a stale supervisor's children get to stop on their own (PDEATHSIG) before they are killed.
LEFTOVER_GRACE_S = 20.0
#: Seconds ``aios down`` gives the supervisor: its own grace for the children (``STOP_GRACE_S``, 20),
#: twice over for a slow agent's warm shutdown plus the API's, and a margin.
DOWN_GRACE_S = 45.0


class AlreadyRunning(Exception):
    """Another ``aios up`` holds the pid file."""

    def __init__(self, pid_file: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"aios up already runs ({who}, pid file {pid_file}); `aios ps` shows it, `aios down` stops it")


@dataclass(frozen=True)
class ProcessRef:
    """A process by pid and start time (``psutil.Process.create_time``): a reused pid is not mistaken for it."""

    name: str
    pid: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The live process, or None if it is gone (or its pid now belongs to another process)."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.create_time) > 0.01 or process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.Error:
            return None

    @classmethod
    def of(cls, name: str, pid: int) -> ProcessRef:
        return cls(name=name, pid=pid, create_time=psutil.Process(pid).create_time())


@dataclass
class UpState:
    """What the state file holds: the supervisor, its children, and what ``ps`` needs to ask their health."""

    supervisor: ProcessRef
    url: str
    agent_name: str
    log_dir: str
    children: list[ProcessRef] = field(default_factory=list)
    #: The certificate to trust for ``url`` when the API's is self-signed (HTTPS from ``[api] tls_*``).
    ca_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        def ref(item: ProcessRef) -> dict[str, Any]:
            return {"name": item.name, "pid": item.pid, "create_time": item.create_time}

        return {
            "supervisor": ref(self.supervisor),
            "url": self.url,
            "agent_name": self.agent_name,
            "log_dir": self.log_dir,
            "children": [ref(child) for child in self.children],
            "ca_file": self.ca_file,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpState:
        return cls(
            supervisor=ProcessRef(**data["supervisor"]),
            url=data["url"],
            agent_name=data["agent_name"],
            log_dir=data["log_dir"],
            children=[ProcessRef(**child) for child in data.get("children", [])],
            ca_file=data.get("ca_file"),
        )


def state_path(pid_file: Path) -> Path:
    return pid_file.with_suffix(".json")


# --------------------------------------------------------------------------- the supervisor's side


class PidFile:
    """The pid file as held by a running supervisor: created, locked and written by :meth:`claim`,
    removed (with the state file) by :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] | None = None

    def claim(self) -> None:
        """Lock and write the pid file; :class:`AlreadyRunning` if another live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        for attempt in range(10):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt < 9 and not _pid_in(handle):  # a `ps` probing the lock right now: try again
                    time.sleep(0.1)
                    continue
                text = _pid_in(handle)
                handle.close()
                raise AlreadyRunning(self.path, int(text) if text else None) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        state_path(self.path).unlink(missing_ok=True)  # a stale one describes processes long gone
        self._handle = handle

    def write_state(self, state: UpState) -> None:
        target = state_path(self.path)
        scratch = target.with_suffix(".json.tmp")
        scratch.write_text(json.dumps(state.to_json(), indent=2), encoding="utf-8")
        scratch.replace(target)

    def release(self) -> None:
        if self._handle is None:
            return
        state_path(self.path).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        self._handle.close()  # drops the lock
        self._handle = None


def _pid_in(handle: IO[str]) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return text if text.isdigit() else ""


# --------------------------------------------------------------------------- everyone else's side


@dataclass
class Found:
    """What the pid file says: ``running`` (its supervisor lives), ``stale`` (it does not) or ``stopped``
    (no pid file). ``state`` is the state file's content when there is one."""

    status: str
    pid_file: Path
    pid: int | None = None
    state: UpState | None = None

    def leftovers(self) -> list[psutil.Process]:
        """Children of a dead supervisor that still run (they should be stopping: PDEATHSIG)."""
        if self.state is None:
            return []
        return [process for child in self.state.children if (process := child.process()) is not None]


def _locked_by_someone(path: Path) -> bool:
    """True if a live process holds the pid file's lock (the supervisor, or one being started)."""
    try:
        with path.open("r", encoding="utf-8") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


def find(pid_file: Path) -> Found:
    """Read the pid file and decide whether its supervisor runs (see :class:`Found`)."""
    try:
        text = pid_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return Found("stopped", pid_file)
    pid = int(text) if text.isdigit() else None
    state: UpState | None = None
    try:
        state = UpState.from_json(json.loads(state_path(pid_file).read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        state = None
    if state is not None and state.supervisor.pid != pid:
        state = None  # from another run
    alive = _locked_by_someone(pid_file)
    if alive and state is not None and state.supervisor.process() is None:
        alive = False  # the lock is someone else's (a `ps` probing it): the recorded supervisor is gone
    return Found("running" if alive else "stale", pid_file, pid, state)


def kill_tree(process: psutil.Process) -> None:
    """SIGKILL ``process`` and every process under it."""
    try:
        family = [process, *process.children(recursive=True)]
    except psutil.Error:
        family = [process]
    for member in family:
        try:
            member.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=5)


def clean_stale(found: Found, grace_s: float = LEFTOVER_GRACE_S) -> list[int]:
    """Remove a stale pid file and state file, after the children it recorded have stopped (given
    ``grace_s`` to finish on their own, then killed with their trees). Returns the pids it killed."""
    killed: list[int] = []
    leftovers = found.leftovers()
    if leftovers:
        _gone, alive = psutil.wait_procs(leftovers, timeout=grace_s)
        for process in alive:
            killed.append(process.pid)
            kill_tree(process)
    state_path(found.pid_file).unlink(missing_ok=True)
    found.pid_file.unlink(missing_ok=True)
    return killed


def stop(found: Found, grace_s: float) -> list[int]:
    """SIGTERM the running supervisor (it stops its children), wait ``grace_s`` for it, then kill it and
    every process under it; then make sure the children it recorded are gone. Returns the pids killed."""
    killed: list[int] = []
    supervisor = found.state.supervisor.process() if found.state else None
    if supervisor is None and found.pid is not None:
        try:
            supervisor = psutil.Process(found.pid)
        except psutil.Error:
            supervisor = None
    if supervisor is not None:
        try:
            supervisor.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
        _gone, alive = psutil.wait_procs([supervisor], timeout=grace_s)
        for process in alive:
            killed.append(process.pid)
            kill_tree(process)
    killed.extend(clean_stale(found, grace_s=5.0))
    return killed


# --------------------------------------------------------------------------- logs


def log_files(log_dir: Path, names: list[str]) -> dict[str, Path]:
    return {name: log_dir / f"{name}.log" for name in names}


def last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` lines of ``path`` (reads from the end; a log may be large)."""
    if count <= 0 or not path.exists():
        return []
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        block, data = 8192, b""
        while end > 0 and data.count(b"\n") <= count:
            start = max(0, end - block)
            handle.seek(start)
            data = handle.read(end - start) + data
            end = start
    return data.decode("utf-8", errors="replace").splitlines()[-count:]


def follow(paths: dict[str, Path], *, interval_s: float = 0.2) -> Iterator[tuple[str, str]]:
    """Yield ``(name, line)`` for each line appended to the files after this call, forever (like
    ``tail -F``: a file that appears later, or is truncated or replaced by a restart, is followed too).
    Where the files end is read now, not at the first ``next()``, so no line written in between is lost."""
    positions: dict[str, tuple[int, int]] = {}  # name → (inode, offset)
    for name, path in paths.items():
        try:
            info = path.stat()
            positions[name] = (info.st_ino, info.st_size)
        except FileNotFoundError:
            positions[name] = (0, 0)
    return _follow(paths, positions, interval_s)


def _follow(
    paths: dict[str, Path], positions: dict[str, tuple[int, int]], interval_s: float
) -> Iterator[tuple[str, str]]:
    pending: dict[str, bytes] = dict.fromkeys(paths, b"")
    while True:
        for name, path in paths.items():
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            inode, offset = positions[name]
            if info.st_ino != inode or info.st_size < offset:
                inode, offset, pending[name] = info.st_ino, 0, b""
            if info.st_size > offset:
                with path.open("rb") as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                offset += len(chunk)
                *lines, pending[name] = (pending[name] + chunk).split(b"\n")
                for line in lines:
                    yield name, line.decode("utf-8", errors="replace")
            positions[name] = (inode, offset)
        time.sleep(interval_s)


def uptime_s(process: psutil.Process | None) -> float | None:
    if process is None:
        return None
    try:
        return max(0.0, time.time() - process.create_time())
    except psutil.Error:
        return None


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# --------------------------------------------------------------------------- health, for `aios ps`


@dataclass
class Health:
    """One process of ``aios up`` as ``aios ps`` shows it."""

    name: str
    pid: int
    running: bool
    healthy: bool
    detail: str
    uptime_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "running": self.running,
            "healthy": self.healthy,
            "health": self.detail,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
        }


def _api_health(url: str, ca_file: str | None = None) -> tuple[bool, str]:
    import requests

    try:
        response = requests.get(f"{url}/readyz", timeout=3, verify=ca_file or True)
    except requests.RequestException as exc:
        return False, f"not answering on {url} ({type(exc).__name__})"
    if response.status_code == 200:
        return True, "ready (GET /readyz 200)"
    return False, f"not ready (GET /readyz {response.status_code}: {response.text[:200]})"


def _agent_health(settings: Any, name: str) -> tuple[bool, str]:
    from aios.agents.health import ROUTABLE, AgentStatus
    from aios.db import session_scope
    from aios.models import Agent
    from aios.timeutil import as_utc, utcnow

    if "@" not in name:  # the agent's name is its Celery hostname (workers.agent.hostname_for)
        name = f"{name}@{socket.gethostname()}"
    with session_scope(settings.database) as session:
        agent = session.get(Agent, name)
        if agent is None:
            return False, f"agent {name!r} not registered yet"
        status, heartbeat = agent.status, as_utc(agent.last_heartbeat_at)
    if heartbeat is None:
        return False, f"{status}, no heartbeat yet"
    age = (utcnow() - heartbeat).total_seconds()
    return AgentStatus(status) in ROUTABLE, f"{status}, heartbeat {age:.0f}s ago"


def _beat_health(settings: Any, pid: int) -> tuple[bool, str]:
    from aios.timing import lease
    from aios.timing.beat import LEASE_NAME

    held = lease.current(settings, LEASE_NAME)
    if held is None or not held.live:
        return False, "no beat leads yet"
    if held.holder.split(":")[1:2] == [str(pid)]:
        return True, "leader"
    return True, f"standby (the leader is {held.holder})"


def health(settings: Any, found: Found) -> list[Health]:
    """Each process of a running (or stale) ``aios up``: alive or not, and its health — the API's
    ``/readyz``, the agent's status and heartbeat in the ledger, whether the beat holds the leader lease."""
    if found.state is None:
        return []
    rows: list[Health] = []
    supervisor = found.state.supervisor.process()
    rows.append(
        Health(
            "up",
            found.state.supervisor.pid,
            supervisor is not None,
            supervisor is not None,
            "supervisor" if supervisor is not None else "gone (killed?): its pid file is stale",
            uptime_s(supervisor),
        )
    )
    for child in found.state.children:
        process = child.process()
        if process is None:
            rows.append(Health(child.name, child.pid, False, False, "not running"))
            continue
        try:
            if child.name == "api":
                healthy, detail = _api_health(found.state.url, found.state.ca_file)
            elif child.name == "agent":
                healthy, detail = _agent_health(settings, found.state.agent_name)
            else:
                healthy, detail = _beat_health(settings, child.pid)
        except Exception as exc:  # noqa: BLE001 - a probe that fails is reported, not raised
            healthy, detail = False, f"unknown ({type(exc).__name__}: {str(exc)[:200]})"
        rows.append(Health(child.name, child.pid, True, healthy, detail, uptime_s(process)))
    return rows


def describe(found: Found) -> str:
    if found.status == "stopped":
        return f"aios up is not running (no pid file at {found.pid_file})"
    if found.status == "stale":
        return f"aios up is not running: stale pid file {found.pid_file} (supervisor pid {found.pid} is gone)"
    return f"aios up is running (supervisor pid {found.pid}, pid file {found.pid_file})"


def render(found: Found, rows: list[Health]) -> str:
    lines = [describe(found)]
    if rows:
        lines.append(f"{'NAME':<6} {'PID':>7}  {'UPTIME':>7}  HEALTH")
        for row in rows:
            lines.append(f"{row.name:<6} {row.pid:>7}  {format_duration(row.uptime_s):>7}  {row.detail}")
    return "\n".join(lines)
