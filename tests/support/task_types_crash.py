"""Task types of the crash-window tests (started with this module in ``[tasks] modules``).

Each one opens a window a crash test aims at: an effect already written and the outcome not yet,
or a run that outlives its soft time limit.
"""

from __future__ import annotations

import os
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import Field

from aios.tasktypes.registry import Parameters, TaskContext, task_type

MODULES = ["tests.support.task_types", "tests.support.task_types_crash"]


def _note(path: str, suffix: str, ctx: TaskContext) -> None:
    with open(f"{path}{suffix}", "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt} {os.getpid()}\n")


class EffectThenBlockParameters(Parameters):
    path: str
    #: How long the first attempt stays alive after its effect, before returning (the crash window).
    block_s: float = Field(30, ge=0, le=120)


@task_type("test.effect_then_block", parameters=EffectThenBlockParameters)
def effect_then_block(params: EffectThenBlockParameters, ctx: TaskContext) -> dict[str, Any]:
    """Notes its start in ``path.started``, writes its effect (``<task id> <attempt>`` in ``path``, as
    ``test.effect`` does), notes ``path.effected``, then — on attempt 1 only — sleeps ``block_s``
    before returning: a kill in that sleep lands after the effect and before the outcome."""
    _note(params.path, ".started", ctx)
    with open(params.path, "a", encoding="utf-8") as handle:
        handle.write(f"{ctx.task_id} {ctx.attempt}\n")
    _note(params.path, ".effected", ctx)
    if ctx.attempt == 1:
        time.sleep(params.block_s)
    return {"attempt": ctx.attempt}


class IgnoreSoftLimitParameters(Parameters):
    path: str
    run_s: float = Field(60, ge=0, le=600)


@task_type("test.ignore_soft_limit", parameters=IgnoreSoftLimitParameters)
def ignore_soft_limit(params: IgnoreSoftLimitParameters, ctx: TaskContext) -> dict[str, Any]:
    """Notes its start in ``path.started``, then keeps running ``run_s`` seconds, swallowing Celery's
    soft time limit each time it is raised (noted in ``path.soft``): only the hard limit stops it."""
    _note(params.path, ".started", ctx)
    deadline = time.monotonic() + params.run_s
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except SoftTimeLimitExceeded:
            _note(params.path, ".soft", ctx)
    return {"ignored": True}
