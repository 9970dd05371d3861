"""Task types: what a task of a given ``type`` does and which parameters it takes.

A task type is a plain function ``run(params, ctx)`` registered under a name with a pydantic model
for its parameters. Parameters are validated when a task is submitted (422 on bad input), so a
worker never meets a task it cannot even start. Plugins register types through the entry-point
group ``aios.task_types`` or through modules listed in ``[tasks] modules``.
"""

from aios.tasktypes.registry import TaskContext, TaskType, get_registry, load_task_types, task_type

__all__ = ["TaskContext", "TaskType", "get_registry", "load_task_types", "task_type"]
