"""Task types: what a task of a given ``type`` does and which parameters it takes.

A task type is a plain function ``run(params, ctx)`` registered under a name with a pydantic model
for its parameters. Parameters are validated when a task is submitted (422 on bad input), so a
worker never meets a task it cannot even start. Plugins register types through the entry-point
group ``aios.task_types`` or through modules listed in ``[tasks] modules``.

- :mod:`aios.tasktypes.registry` — the registry, ``@task_type``, ``TaskContext`` (a leaf: imports no type)
- :mod:`aios.tasktypes.loading` — loads the built-ins, entry points and ``[tasks] modules`` into it
- :mod:`aios.tasktypes.signals` — ``TaskFailure`` and ``TaskTimedOut``, what a handler raises to end its run
- :mod:`aios.tasktypes.builtin`, :mod:`aios.tasktypes.command` — the built-in types
"""

from aios.tasktypes.loading import load_task_types
from aios.tasktypes.registry import TaskContext, TaskType, get_registry, task_type
from aios.tasktypes.signals import TaskFailure, TaskSignal, TaskTimedOut

__all__ = [
    "TaskContext",
    "TaskFailure",
    "TaskSignal",
    "TaskTimedOut",
    "TaskType",
    "get_registry",
    "load_task_types",
    "task_type",
]
