"""Running one command under real resource limits: the plain logic behind the ``command`` task type.

A command is an argv list run without a shell (so ``;``, ``$(..)`` and ``|`` are literal arguments),
in a process group of its own and, where the agent can make one, a cgroup of its own (aios.sandbox.cgroups),
as the unprivileged ``agents.command_user`` (aios.sandbox.identity), with stdin from /dev/null and an
environment built from scratch: the agent's ``PATH`` plus what the request gives (never ``PATH``
itself or ``LD_*``, which would change which program runs or inject code into an allowed one).
Memory, processes and CPU seconds are limits of the whole command (its cgroup), with RLIMITs per
process as the fallback and backstop. Both output streams are read at once and the first
``output_kb`` KiB of each kept; the rest is read too (so a chatty program is never blocked on a full
pipe, and behaves the same whatever the limit) and only counted. At its wall time every process of
the command gets SIGTERM, then SIGKILL 2 s later; when the command's first process exits, whatever it
left behind is killed, so nothing of a finished command keeps running without limits.

The limits a request may use are the system limits (:mod:`aios.ops.limits`) or lower; only an admin may
ask for more. The API refuses a raise with 422 and the agent checks again at run time (a task of
type ``command`` may also come through POST /tasks or a schedule).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from aios.ops.limits import SystemLimits
from aios.sandbox import cgroups
from aios.sandbox.cgroups import CommandGroup
from aios.sandbox.identity import CommandUser

#: The task type (and so the capability) that runs commands.
COMMAND_TYPE = "command"
MAX_ARGS = 256
MAX_ARG_CHARS = 4096
MAX_ENV = 64
MAX_ENV_VALUE_CHARS = 32_768
MAX_CWD_CHARS = 4096
#: Upper bounds of a limit, admin or not (the same as /system/limits accepts).
MAX_CPU_S = MAX_WALL_S = 7 * 86_400
MAX_MEMORY_MB = MAX_OUTPUT_KB = MAX_FILE_SIZE_MB = 1_048_576
MAX_PIDS = 1_000_000
#: Between SIGTERM and SIGKILL to the group at the wall time.
TERM_GRACE_S = 2.0
#: How long leftovers are read from the pipes after the command's group is gone. Only a process
#: that left the group (setsid) can hold them open longer; it is not waited for.
DRAIN_S = 2.0
#: How often a running command's cgroup is asked whether it went over its CPU or memory limit: the
#: loop turns once per chunk of output, and the cgroup's files need not be read that often.
LIMIT_CHECK_S = 0.05
#: A command's task gets this much more time than the command's wall time, so the command's own
#: deadline (graceful: TERM, then KILL) fires before Celery's soft time limit.
TASK_TIMEOUT_MARGIN_S = 10
READ_CHUNK_BYTES = 65_536

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Environment variables a request may not set, and prefixes likewise refused.
FORBIDDEN_ENV = frozenset({"PATH"})
FORBIDDEN_ENV_PREFIXES = ("LD_",)

Argument = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ARG_CHARS)]


def _no_nul(text: str, what: str) -> str:
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL characters")
    return text


class CommandLimits(BaseModel):
    """Limits a request asks for; each absent one is the system limit in force when the command runs."""

    model_config = ConfigDict(extra="forbid")

    cpu_s: int | None = Field(
        None, ge=1, le=MAX_CPU_S, description="CPU seconds of the whole command (its cgroup; else RLIMIT_CPU)"
    )
    memory_mb: int | None = Field(
        None,
        ge=16,
        le=MAX_MEMORY_MB,
        description="MiB of the whole command (its cgroup) and address space per process (RLIMIT_AS)",
    )
    output_kb: int | None = Field(None, ge=1, le=MAX_OUTPUT_KB, description="KiB kept of stdout and of stderr")
    pids: int | None = Field(
        None, ge=1, le=MAX_PIDS, description="processes at once (its cgroup's pids.max; else RLIMIT_NPROC)"
    )
    file_size_mb: int | None = Field(
        None, ge=1, le=MAX_FILE_SIZE_MB, description="largest file it may write, MiB (RLIMIT_FSIZE)"
    )


class CommandParameters(BaseModel):
    """The parameters of a ``command`` task (POST /commands builds them; POST /tasks may give them).

    Unknown fields are errors, as for every task type's parameters (``aios.tasktypes.registry.Parameters``,
    not imported here: the task types import the sandbox, never the reverse).
    """

    model_config = ConfigDict(extra="forbid")

    argv: list[Argument] = Field(min_length=1, max_length=MAX_ARGS)
    env: dict[str, str] = Field(default_factory=dict, max_length=MAX_ENV)
    #: Relative to the agent's ``agents.work_dir`` (its default); must be an existing directory.
    cwd: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CWD_CHARS)] | None = None
    #: Wall time in seconds; default ``command_wall_s``.
    timeout_s: int | None = Field(None, ge=1, le=MAX_WALL_S)
    limits: CommandLimits = Field(default_factory=CommandLimits)

    @field_validator("argv")
    @classmethod
    def _argv(cls, argv: list[str]) -> list[str]:
        for index, arg in enumerate(argv):
            _no_nul(arg, f"argv[{index}]")
        return argv

    @field_validator("env")
    @classmethod
    def _env(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            check_env_name(name)
            if len(value) > MAX_ENV_VALUE_CHARS:
                raise ValueError(f"env[{name}] is longer than {MAX_ENV_VALUE_CHARS} characters")
            _no_nul(value, f"env[{name}]")
        return env

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, cwd: str | None) -> str | None:
        return None if cwd is None else _no_nul(cwd, "cwd")


def check_env_name(name: str) -> None:
    if not ENV_NAME.match(name):
        raise ValueError(f"env name {name[:40]!r} must be letters, digits and _ (not starting with a digit)")
    if name in FORBIDDEN_ENV or name.startswith(FORBIDDEN_ENV_PREFIXES):
        raise ValueError(
            f"env name {name!r} may not be set: it would change which program runs "
            "(PATH comes from the agent; LD_* are refused)"
        )


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class Limits:
    """The limits one run uses, all resolved."""

    cpu_s: int
    memory_mb: int
    output_kb: int
    wall_s: int
    pids: int = 256
    file_size_mb: int = 1024

    def to_dict(self) -> dict[str, int]:
        return {
            "cpu_s": self.cpu_s,
            "memory_mb": self.memory_mb,
            "output_kb": self.output_kb,
            "wall_s": self.wall_s,
            "pids": self.pids,
            "file_size_mb": self.file_size_mb,
        }


#: A request field and the system limit it is checked against.
LIMIT_FIELDS: tuple[tuple[str, str], ...] = (
    ("limits.cpu_s", "command_cpu_s"),
    ("limits.memory_mb", "command_memory_mb"),
    ("limits.output_kb", "command_output_kb"),
    ("limits.pids", "command_pids"),
    ("limits.file_size_mb", "command_file_size_mb"),
    ("timeout_s", "command_wall_s"),
)


def requested(params: CommandParameters, field_name: str) -> int | None:
    if field_name == "timeout_s":
        return params.timeout_s
    return getattr(params.limits, field_name.removeprefix("limits."))  # type: ignore[no-any-return]


def raised_limits(params: CommandParameters, current: SystemLimits) -> list[tuple[str, str]]:
    """The requested values above the limits in force: (field, message naming value and limit); [] = none."""
    raised = []
    for field_name, limit_name in LIMIT_FIELDS:
        value, limit = requested(params, field_name), getattr(current, limit_name)
        if value is not None and value > limit:
            raised.append((field_name, f"{field_name} ({value}) is above the system limit {limit_name} ({limit})"))
    return raised


def effective_limits(params: CommandParameters, current: SystemLimits, *, task_timeout_s: int | None = None) -> Limits:
    """What a run uses: the request's values, else the limits in force; the wall time never exceeds
    the task's own time limit."""
    wall_s = params.timeout_s or current.command_wall_s
    if task_timeout_s is not None:
        wall_s = min(wall_s, task_timeout_s)
    return Limits(
        cpu_s=params.limits.cpu_s or current.command_cpu_s,
        memory_mb=params.limits.memory_mb or current.command_memory_mb,
        output_kb=params.limits.output_kb or current.command_output_kb,
        wall_s=wall_s,
        pids=params.limits.pids or current.command_pids,
        file_size_mb=params.limits.file_size_mb or current.command_file_size_mb,
    )


def task_timeout_for(wall_s: int, task_timeout_max_s: int) -> int:
    """The ``timeout_s`` of a command's task: its wall time plus a margin, within the orchestrator's maximum."""
    return min(task_timeout_max_s, wall_s + TASK_TIMEOUT_MARGIN_S)


# --------------------------------------------------------------------------- output


@dataclass
class OutputCapture:
    """Keeps the first ``limit_bytes`` of a stream and counts every byte."""

    limit_bytes: int
    kept: bytearray = field(default_factory=bytearray)
    total_bytes: int = 0

    def feed(self, data: bytes) -> None:
        self.total_bytes += len(data)
        room = self.limit_bytes - len(self.kept)
        if room > 0:
            self.kept += data[:room]

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self.kept)

    def text(self) -> str:
        """The kept bytes as text the ledger can store: invalid UTF-8 and NUL become U+FFFD."""
        return self.kept.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Sandbox:
    """Where a run is confined: the user it drops to (None: the agent's own, only in tests) and
    whether it gets a cgroup of its own (aios.sandbox.cgroups)."""

    user: CommandUser | None = None
    cgroup: bool = False


@dataclass
class Outcome:
    """How a run ended. ``exit_code`` is None when a signal ended it (then ``signal`` names it)."""

    pid: int
    exit_code: int | None
    signal: str | None
    stdout: OutputCapture
    stderr: OutputCapture
    cpu_s: float
    max_rss_kb: int
    wall_s: float
    #: The wall time (or the task's soft time limit) ended it.
    timed_out: bool
    #: "cpu_limit" or "memory_limit" when the command's cgroup went over that limit and was killed.
    stopped_by: str | None = None
    #: What confined it: {"user", "cgroup" ("v2", "v1" or None), "group_limits"}.
    sandbox: dict[str, Any] = field(default_factory=dict)

    def to_result(self, limits: Limits) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdout": self.stdout.text(),
            "stderr": self.stderr.text(),
            "stdout_truncated": self.stdout.truncated,
            "stderr_truncated": self.stderr.truncated,
            "stdout_bytes": self.stdout.total_bytes,
            "stderr_bytes": self.stderr.total_bytes,
            "cpu_s": round(self.cpu_s, 3),
            "max_rss_kb": self.max_rss_kb,
            "wall_s": round(self.wall_s, 3),
            "timed_out": self.timed_out,
            "stopped_by": self.stopped_by,
            "pid": self.pid,
            "limits": limits.to_dict(),
            "sandbox": self.sandbox,
        }


def base_env(given: Mapping[str, str]) -> dict[str, str]:
    """The agent's PATH (how the allowlisted names are found) and the request's variables; nothing else."""
    return {"PATH": os.environ.get("PATH") or os.defpath, **given}


_PR_SET_PDEATHSIG = 1
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_libc: Any = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - no libc to load: the child just does not die with its parent
        _libc = None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _drop_capabilities() -> None:
    """Empty the effective, permitted and inheritable sets (capset(2)). A root agent's uid change did
    that already; a non-root agent holding CAP_SETUID keeps them across its uid change, and a program
    with file capabilities could pick up the inheritable ones."""
    if _libc is None:
        return
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    if _libc.capset(ctypes.byref(header), (_CapData * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset: could not drop the capabilities")


def _bounded(kind: int, soft: int, hard: int) -> tuple[int, int]:
    """(soft, hard) for ``kind``, never above the hard limit the agent itself runs under (or setrlimit fails)."""
    _, current_hard = resource.getrlimit(kind)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    return soft, hard


@dataclass(frozen=True)
class ChildSetup:
    """What the child does between fork and exec, all decided before the fork."""

    cpu_s: int
    memory_bytes: int
    file_size_bytes: int
    #: RLIMIT_NPROC, only without a cgroup's pids.max (it counts every process of the user).
    nproc: int | None
    #: Whether a cgroup accounts CPU for the whole command: RLIMIT_CPU is then only a backstop.
    group_cpu: bool
    group: CommandGroup | None
    user: CommandUser | None

    def __call__(self) -> None:
        """Runs in the child, so it does as little as it can: a few system calls, in this order —
        join the cgroup (needs the agent's rights), set the limits, drop to the command user, then ask
        to die with the parent (a uid change clears that request, so it comes last).

        RLIMIT_CPU: SIGXCPU at ``cpu_s`` (fatal unless caught), SIGKILL one CPU second later; with a
        cgroup the agent stops the whole command at ``cpu_s`` first and these are 2 s later.
        """
        if self.group is not None:
            self.group.join()
        cpu_soft = self.cpu_s + 2 if self.group_cpu else self.cpu_s
        resource.setrlimit(resource.RLIMIT_CPU, _bounded(resource.RLIMIT_CPU, cpu_soft, cpu_soft + 1))
        resource.setrlimit(resource.RLIMIT_AS, _bounded(resource.RLIMIT_AS, self.memory_bytes, self.memory_bytes))
        resource.setrlimit(
            resource.RLIMIT_FSIZE, _bounded(resource.RLIMIT_FSIZE, self.file_size_bytes, self.file_size_bytes)
        )
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.nproc is not None and self.user is not None:  # counted per user: never the agent's
            resource.setrlimit(resource.RLIMIT_NPROC, _bounded(resource.RLIMIT_NPROC, self.nproc, self.nproc))
        if self.user is not None:
            if _libc is not None:  # an agent given CAP_SETUID as an ambient capability must not pass it on
                _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
            self.user.drop()
            _drop_capabilities()
        if _libc is not None:  # a hard-killed agent process takes its command's first process with it
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone (or only a setuid member is left)
        pass


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _kill_all(pgid: int, group: CommandGroup | None, sig: int) -> None:
    """``sig`` to the command's process group and, with a cgroup, to every process in it (setsid ones too)."""
    _killpg(pgid, sig)
    if group is not None:
        if sig == signal.SIGKILL:
            group.kill()
        else:
            group.signal(sig)


def _over_limit(group: CommandGroup | None, limits: Limits) -> str | None:
    """Which limit of the whole command its cgroup went over, if any."""
    if group is None:
        return None
    if group.oom_killed():
        return "memory_limit"
    used = group.cpu_s()
    if used is not None and used >= limits.cpu_s:
        return "cpu_limit"
    return None


def run_command(
    argv: list[str], *, env: Mapping[str, str], cwd: str, limits: Limits, sandbox: Sandbox | None = None
) -> Outcome:
    """Run ``argv`` under ``limits`` and return how it ended; never leaves a process of its group behind.

    Raises OSError if the program cannot be started (not found, not executable). Celery's soft time
    limit, raised while the command runs, kills the group at once and counts as a timeout.
    """
    sandbox = sandbox or Sandbox()
    with cgroups.command_group(
        cgroups.group_name(os.getpid()),
        memory_bytes=limits.memory_mb * 1024 * 1024,
        pids=limits.pids,
        enabled=sandbox.cgroup,
    ) as group:
        return _run(argv, env=env, cwd=cwd, limits=limits, sandbox=sandbox, group=group)


def _run(
    argv: list[str], *, env: Mapping[str, str], cwd: str, limits: Limits, sandbox: Sandbox, group: CommandGroup | None
) -> Outcome:
    enforced = group.enforces if group is not None else frozenset()
    setup = ChildSetup(
        cpu_s=limits.cpu_s,
        memory_bytes=limits.memory_mb * 1024 * 1024,
        file_size_bytes=limits.file_size_mb * 1024 * 1024,
        nproc=None if "pids" in enforced else limits.pids,
        group_cpu="cpu" in enforced,
        group=group,
        user=sandbox.user,
    )
    started = time.monotonic()
    process = subprocess.Popen(  # noqa: S603 - argv, no shell: the point of this module
        argv,
        shell=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
        preexec_fn=setup,  # noqa: PLW1509
    )
    pgid = process.pid  # start_new_session: the first process leads its own group
    assert process.stdout is not None and process.stderr is not None
    captures = {
        process.stdout.fileno(): OutputCapture(limits.output_kb * 1024),
        process.stderr.fileno(): OutputCapture(limits.output_kb * 1024),
    }
    stdout, stderr = captures.values()
    selector = selectors.DefaultSelector()
    for fd in captures:
        selector.register(fd, selectors.EVENT_READ)
    deadline = started + limits.wall_s
    status: int | None = None
    usage: Any = None
    timed_out = False
    stopped_by: str | None = None
    kill_at: float | None = None
    drain_until = 0.0
    check_at = 0.0
    try:
        while True:
            if status is None:
                pid, wait_status, wait_usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    status, usage = wait_status, wait_usage
                    stopped_by = stopped_by or _over_limit(group, limits)
                    _kill_all(pgid, group, signal.SIGKILL)  # what the command left behind dies with it
                    drain_until = time.monotonic() + DRAIN_S
            if status is not None and not selector.get_map():
                break
            now = time.monotonic()
            if status is None:
                if stopped_by is None and now >= check_at:
                    check_at = now + LIMIT_CHECK_S
                    if stopped_by := _over_limit(group, limits):
                        _kill_all(pgid, group, signal.SIGKILL)
                if not timed_out and now >= deadline:
                    timed_out = True
                    _kill_all(pgid, group, signal.SIGTERM)
                    kill_at = now + TERM_GRACE_S
                elif kill_at is not None and now >= kill_at:
                    _kill_all(pgid, group, signal.SIGKILL)
                    kill_at = None
            elif now >= drain_until:
                break  # only a process that left the group can still hold the pipes
            if not selector.get_map():
                time.sleep(0.05)
                continue
            for key, _ in selector.select(timeout=0.05):
                data = os.read(key.fd, READ_CHUNK_BYTES)
                if data:
                    captures[key.fd].feed(data)
                else:
                    selector.unregister(key.fd)
    except SoftTimeLimitExceeded:
        timed_out = True
    finally:
        if status is None:  # timed out by Celery, or an error in this loop: the group must not outlive us
            _kill_all(pgid, group, signal.SIGKILL)
            try:
                _, status, usage = os.wait4(process.pid, 0)
            except ChildProcessError:  # reaped just before the interruption: its status is lost
                status = signal.SIGKILL  # a wait status meaning "killed by SIGKILL"
        _kill_all(pgid, group, signal.SIGKILL)
        selector.close()
        process.stdout.close()
        process.stderr.close()
        process.returncode = os.waitstatus_to_exitcode(status)
    exit_code: int | None = None
    ended_by: str | None = None
    if os.WIFSIGNALED(status):
        ended_by = signal_name(os.WTERMSIG(status))
    else:
        exit_code = os.WEXITSTATUS(status)
    rusage_cpu_s = usage.ru_utime + usage.ru_stime if usage else 0.0
    group_cpu_s = group.cpu_s() if group is not None else None
    return Outcome(
        pid=process.pid,
        exit_code=exit_code,
        signal=ended_by,
        stdout=stdout,
        stderr=stderr,
        cpu_s=max(rusage_cpu_s, group_cpu_s or 0.0),
        max_rss_kb=int(usage.ru_maxrss) if usage else 0,
        wall_s=time.monotonic() - started,
        timed_out=timed_out,
        stopped_by=stopped_by,
        sandbox={
            "user": sandbox.user.name if sandbox.user else None,
            "cgroup": f"v{group.version}" if group is not None else None,
            "group_limits": sorted(enforced),
        },
    )
