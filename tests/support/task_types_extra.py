"""Task types only some test agents have (started with this module in ``[tasks] modules``).

Routing matches a task's type against an agent's capabilities, and an agent's capabilities are the
task types it has registered: an agent started with this module can run these types, the others not.
"""

from __future__ import annotations

from typing import Any

from aios.tasktypes.registry import AnyParameters, TaskContext, task_type

MODULES = ["tests.support.task_types", "tests.support.task_types_extra"]


@task_type("test.special", parameters=AnyParameters)
def special(params: AnyParameters, ctx: TaskContext) -> dict[str, Any]:
    """Returns the agent that ran it."""
    return {"agent": ctx.agent}


@task_type("test.rare", parameters=AnyParameters)
def rare(params: AnyParameters, ctx: TaskContext) -> dict[str, Any]:
    """Returns the agent that ran it."""
    return {"agent": ctx.agent}
