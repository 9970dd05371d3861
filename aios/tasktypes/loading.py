"""Which task types a process knows: the built-ins, every ``aios.task_types`` entry point, ``[tasks] modules``.

Kept apart from :mod:`aios.tasktypes.registry`, which every task type imports for ``@task_type``: the
registry then never imports a task type back, and the built-ins are loaded the way a plugin is.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from importlib.metadata import entry_points

from aios.tasktypes.registry import Registry, get_registry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "aios.task_types"

_loaded: set[str] = set()


def load_task_types(modules: Iterable[str] = ()) -> Registry:
    """Import the built-ins, every ``aios.task_types`` entry point, and ``modules``; idempotent."""
    importlib.import_module("aios.tasktypes.builtin")
    importlib.import_module("aios.tasktypes.command")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.value in _loaded:
            continue
        try:
            entry.load()
        except Exception:  # a broken plugin must not take the whole agent down
            logger.exception("could not load task-type plugin %s = %s", entry.name, entry.value)
        _loaded.add(entry.value)
    for module in modules:
        if module not in _loaded:
            importlib.import_module(module)
            _loaded.add(module)
    return get_registry()
