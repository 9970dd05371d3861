"""Task types used only by the test suite; loaded through ``[tasks] modules`` (the plugin path)."""

from __future__ import annotations

import os
import time
from typing import Any

from pydantic import Field

from aios.tasktypes.registry import Parameters, TaskContext, task_type


class FlakyParameters(Parameters):
    fail_times: int = Field(ge=0)


@task_type("test.flaky", parameters=FlakyParameters)
def flaky(params: FlakyParameters, ctx: TaskContext) -> dict[str, Any]:
    """Fails on its first ``fail_times`` attempts, then succeeds."""
    if ctx.attempt <= params.fail_times:
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


@task_type("test.always_fail", parameters=Parameters)
def always_fail(params: Parameters, ctx: TaskContext) -> None:
    raise RuntimeError(f"always fails (attempt {ctx.attempt})")


class TouchParameters(Parameters):
    path: str


@task_type("test.touch", parameters=TouchParameters)
def touch(params: TouchParameters, ctx: TaskContext) -> dict[str, Any]:
    """Appends one line per run to ``path``: lets a test count real executions."""
    with open(params.path, "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n")
    return {"ok": True}


class ProgressParameters(Parameters):
    steps: int = Field(10, ge=1, le=1000)
    sleep_s: float = Field(0.3, ge=0, le=60)


@task_type("test.progress", parameters=ProgressParameters)
def progress(params: ProgressParameters, ctx: TaskContext) -> dict[str, Any]:
    """Reports 100/steps, 2*100/steps, ... 100 percent, sleeping ``sleep_s`` before each report; stops
    early (reporting it) once a report is refused because the run was fenced off."""
    reported = []
    for step in range(1, params.steps + 1):
        time.sleep(params.sleep_s)
        percent = round(100 * step / params.steps, 6)
        if not ctx.progress(percent, f"step {step} of {params.steps}"):
            return {"stopped_at": percent, "reported": reported}
        reported.append(percent)
    return {"reported": reported}


class ReverseParameters(Parameters):
    text: str = Field(max_length=1000)


@task_type("test.reverse", parameters=ReverseParameters)
def reverse(params: ReverseParameters, ctx: TaskContext) -> dict[str, Any]:
    """Returns ``text`` backwards: a result value that is not in the parameters (search tests)."""
    return {"reversed": params.text[::-1]}


@task_type("test.refuse", parameters=Parameters)
def refuse(params: Parameters, ctx: TaskContext) -> None:
    """Fails without retrying (TaskFailure): ends FAILED on its first attempt."""
    from aios.tasktypes import TaskFailure

    raise TaskFailure("refused: this task type always refuses")


class EffectParameters(Parameters):
    path: str
    sleep_s: float = Field(0, ge=0, le=120)
    #: How long attempts after the first sleep (default: ``sleep_s``).
    retry_sleep_s: float | None = Field(None, ge=0, le=120)
    #: Check the run still holds the task before writing the effect (an idempotent task's guard).
    check_fence: bool = False
    #: With ``check_fence``: how long to keep asking while the database does not answer. 0: an unanswered
    #: check counts as holding (``ctx.progress`` keeps the report for later and returns True); above 0 the
    #: run acts only on a definite answer, and fails its attempt if none came in time.
    fence_wait_s: float = Field(0, ge=0, le=300)


@task_type("test.effect", parameters=EffectParameters)
def effect(params: EffectParameters, ctx: TaskContext) -> dict[str, Any]:
    """The fault suite's effects ledger: notes ``<task id> <attempt> <pid>`` in ``path.started`` when a
    run starts (so a test knows which process to kill), sleeps ``sleep_s``, then appends
    ``<task id> <attempt>`` to ``path`` as its one effect, only at the very end of a run. With
    ``check_fence``, a run that was fenced off meanwhile (re-routed, retried elsewhere) writes nothing."""
    with open(f"{params.path}.started", "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n")
    later = params.retry_sleep_s if params.retry_sleep_s is not None else params.sleep_s
    time.sleep(params.sleep_s if ctx.attempt == 1 else later)
    if params.check_fence and params.fence_wait_s > 0:
        if not _still_holds(ctx, params.fence_wait_s):
            return {"attempt": ctx.attempt, "fenced_off": True}
    elif params.check_fence:
        ctx.progress(100, "effect next")
        if not ctx.flush_progress():
            return {"attempt": ctx.attempt, "fenced_off": True}
    with open(params.path, "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt}\n")
    return {"attempt": ctx.attempt}


def _still_holds(ctx: TaskContext, wait_s: float) -> bool:
    """The fenced progress write, asked again until the database answers (for up to ``wait_s``): True if
    this run still holds the task. Its commit waits for the WAL flush, so it also makes the claim durable."""
    from sqlalchemy.exc import SQLAlchemyError

    from aios.tasks.progress import record_progress

    assert ctx.settings is not None and ctx.dispatch_id is not None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return record_progress(
                ctx.settings, ctx.task_id, ctx.dispatch_id, 100.0, "effect next", actor=f"worker:{ctx.agent}"
            )
        except SQLAlchemyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class PoisonParameters(Parameters):
    path: str


@task_type("test.poison", parameters=PoisonParameters)
def poison(params: PoisonParameters, ctx: TaskContext) -> None:
    """Notes its start in ``path.started``, then SIGKILLs its own process: every run dies the same way."""
    import signal

    with open(f"{params.path}.started", "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n")
    os.kill(os.getpid(), signal.SIGKILL)
