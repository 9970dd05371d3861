"""The built-in ``command`` task type: run an allowlisted program under resource limits (aios.sandbox.run).

An agent announces the capability ``command`` only when its ``[agents] command_allowlist`` is not
empty, so routing never sends a command to an agent that would refuse every one. ``argv[0]`` must
equal an allowlist entry exactly (``echo`` does not allow ``/bin/echo``, nor the reverse); anything
else ends FAILED with ``not_allowed`` and nothing is started.

How a run ends:

* exit status 0 → SUCCEEDED, the result holds exit code, output, CPU time and peak RSS;
* another exit status (``exit_status``) or a signal (``signal``: the CPU limit's SIGXCPU, SIGKILL...) →
  FAILED, with the same result stored on the task: a command is not retried, it may have had effects;
* past its wall time → TIMED_OUT, with what it produced until then;
* over the CPU or memory limit of its cgroup (all its processes together) → FAILED with ``cpu_limit`` or
  ``memory_limit``, the whole group killed;
* ``not_allowed``, ``limit_exceeded``, ``bad_cwd``, ``no_command_user``, ``spawn_failed`` → FAILED before
  anything ran.

It runs as ``agents.command_user`` (aios.sandbox.identity), in a fresh private directory unless ``cwd`` is
given, in a cgroup of its own where the machine offers one (aios.sandbox.cgroups); ``result.sandbox`` says
which.

The task's ``error`` starts with that reason code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from aios.config import Settings, load_settings
from aios.db import session_scope
from aios.errors import ConfigError
from aios.models import Task, User
from aios.ops.limits import SystemLimits, current
from aios.sandbox.identity import check_agent_config, private_dir
from aios.sandbox.run import (
    COMMAND_TYPE,
    CommandParameters,
    Sandbox,
    base_env,
    effective_limits,
    raised_limits,
    run_command,
)
from aios.security.roles import ADMIN
from aios.tasktypes.registry import TaskContext, task_type
from aios.tasktypes.signals import TaskFailure, TaskTimedOut


def allowed(settings: Settings, argv0: str) -> bool:
    return argv0 in settings.agents.command_allowlist


def _limits_for(settings: Settings, task_id: str) -> tuple[SystemLimits, int | None, bool]:
    """The limits in force, the task's own timeout_s, and whether its owner may exceed the limits.

    A task without an owner was made by something holding the database credentials (the CLI), which
    could change the limits anyway; an owner may exceed them only while an enabled admin.
    """
    with session_scope(settings.database) as session:
        limits = current(session, settings)
        row = session.execute(select(Task.owner, Task.timeout_s).where(Task.id == task_id)).first()
        if row is None:
            return limits, None, False
        if row.owner is None:
            return limits, row.timeout_s, True
        user = session.execute(select(User.role, User.disabled).where(User.name == row.owner)).first()
        return limits, row.timeout_s, user is not None and user.role == ADMIN and not user.disabled


def working_dir(settings: Settings, cwd: str | None) -> str:
    """``cwd`` resolved against ``agents.work_dir`` (an absolute cwd stays as it is); FAILED unless a directory.

    Not a security boundary: the program may change directory itself. It only says where it starts.
    """
    path = Path(settings.agents.work_dir).expanduser() / (cwd or ".")
    if not path.is_dir():
        raise TaskFailure(f"bad_cwd: {str(path)[:300]!r} is not an existing directory on this agent")
    return str(path.resolve())


@task_type(
    COMMAND_TYPE,
    parameters=CommandParameters,
    description="Runs an allowlisted program (argv, no shell) under CPU, memory, wall-time and output limits.",
)
def command(params: CommandParameters, ctx: TaskContext) -> dict[str, Any]:
    settings = ctx.settings or load_settings()
    argv0 = params.argv[0]
    if not allowed(settings, argv0):
        raise TaskFailure(f"not_allowed: {argv0[:200]!r} is not on the command_allowlist of agent {ctx.agent}")
    system, task_timeout_s, may_exceed = _limits_for(settings, ctx.task_id)
    raised = raised_limits(params, system)
    if raised and not may_exceed:
        raise TaskFailure(
            "limit_exceeded: " + "; ".join(message for _, message in raised) + " (only an admin may raise a limit)"
        )
    limits = effective_limits(params, system, task_timeout_s=task_timeout_s)
    try:  # checked at agent start too; again here, since the user may have gone since
        user = check_agent_config(settings)
    except ConfigError as exc:
        raise TaskFailure(f"no_command_user: {exc.message}") from exc
    with private_dir(user) as home:
        cwd = working_dir(settings, params.cwd) if params.cwd else home
        env = {"HOME": home, "TMPDIR": home, **base_env(params.env)}
        try:
            outcome = run_command(params.argv, env=env, cwd=cwd, limits=limits, sandbox=Sandbox(user=user, cgroup=True))
        except OSError as exc:
            raise TaskFailure(f"spawn_failed: could not start {argv0[:200]!r}: {exc.strerror or exc}") from exc
    result = outcome.to_result(limits)
    if outcome.timed_out:
        raise TaskTimedOut(
            f"timed_out: the command ran past its wall time of {limits.wall_s} s; its process group was killed",
            result=result,
        )
    if outcome.stopped_by == "memory_limit":
        raise TaskFailure(
            f"memory_limit: the command's processes together went over its memory limit of "
            f"{limits.memory_mb} MiB; all of them were killed",
            result=result,
        )
    if outcome.stopped_by == "cpu_limit":
        raise TaskFailure(
            f"cpu_limit: the command's processes together used its CPU limit of {limits.cpu_s} s; "
            "all of them were killed",
            result=result,
        )
    if outcome.signal is not None:
        hint = f" (it used its CPU limit of {limits.cpu_s} s)" if outcome.cpu_s >= limits.cpu_s - 0.05 else ""
        raise TaskFailure(f"signal: the command was killed by {outcome.signal}{hint}", result=result)
    if outcome.exit_code:
        raise TaskFailure(f"exit_status: the command exited with status {outcome.exit_code}", result=result)
    return result
