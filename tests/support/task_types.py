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
    from aios.errors import TaskFailure

    raise TaskFailure("refused: this task type always refuses")
