"""Task types used only by the test suite; loaded through ``[tasks] modules`` (the plugin path)."""

from __future__ import annotations

import os
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
