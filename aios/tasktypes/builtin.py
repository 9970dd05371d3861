"""Built-in task types every agent has."""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from aios.tasktypes.registry import AnyParameters, Parameters, TaskContext, task_type


@task_type("echo", parameters=AnyParameters, description="Returns its parameters unchanged.")
def echo(params: AnyParameters, ctx: TaskContext) -> dict[str, Any]:
    return params.model_dump()


class SleepParameters(Parameters):
    seconds: float = Field(ge=0, le=86_400)


@task_type("sleep", parameters=SleepParameters, description="Sleeps for `seconds`, then returns them.")
def sleep(params: SleepParameters, ctx: TaskContext) -> dict[str, Any]:
    time.sleep(params.seconds)
    return {"slept_s": params.seconds}
