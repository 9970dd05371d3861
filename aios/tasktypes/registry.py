"""The task-type registry, the decorator that fills it, and what a handler is given.

A leaf of the package: it imports no task type. :mod:`aios.tasktypes.loading` imports the built-ins and
the plugins, whose ``@task_type`` fills this registry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from aios.errors import UnknownTaskType, ValidationFailed

if TYPE_CHECKING:
    from aios.config import Settings
    from aios.tasks.progress import ProgressReporter


class Parameters(BaseModel):
    """Base for parameter models: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class AnyParameters(BaseModel):
    """Accepts any JSON object (the ``echo`` type)."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True)
class TaskContext:
    """What a running task may know about itself, and its way to report progress.

    The runner gives ``settings`` and ``dispatch_id`` (the run's fence); a context built without them
    (a unit test calling a handler directly) keeps reports in :attr:`last_progress` and writes nothing.
    """

    task_id: str
    attempt: int
    agent: str
    settings: Settings | None = field(default=None, repr=False, compare=False)
    dispatch_id: str | None = None
    _reporter: ProgressReporter | None = field(default=None, init=False, repr=False, compare=False)
    #: The last report given to :meth:`progress` (percent, message), written or not.
    last_progress: tuple[float, str | None] | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        if self.settings is not None and self.dispatch_id is not None:
            from aios.tasks.progress import ProgressReporter

            reporter = ProgressReporter(self.settings, self.task_id, self.dispatch_id, actor=f"worker:{self.agent}")
            object.__setattr__(self, "_reporter", reporter)

    def progress(self, percent: float, message: str | None = None) -> bool:
        """Report how far the run is (0-100) and what it is doing; see :mod:`aios.tasks.progress`.

        Returns False once this run no longer holds the task (cancelled, timed out, re-routed): the
        report was ignored and the handler may stop. Raises ValidationFailed for a percent outside 0..100.
        """
        from aios.tasks.progress import check_progress

        value, text = check_progress(percent, message)
        object.__setattr__(self, "last_progress", (value, text))
        return self._reporter.report(value, text) if self._reporter is not None else True

    def flush_progress(self) -> bool:
        """Write a report the rate limit held back (the runner calls this when the handler ends)."""
        return self._reporter.flush() if self._reporter is not None else True


@dataclass(frozen=True)
class TaskType:
    name: str
    run: Callable[[Any, TaskContext], Any]
    parameters: type[BaseModel]
    description: str = ""

    def validate(self, raw: Any) -> BaseModel:
        if not isinstance(raw, dict):
            raise ValidationFailed("parameters must be a JSON object", field="parameters")
        try:
            return self.parameters.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            field = f"parameters.{where}" if where else "parameters"
            raise ValidationFailed(
                f"invalid parameters for task type {self.name!r}: {field}: {first['msg']}", field=field
            ) from exc


class Registry:
    def __init__(self) -> None:
        self._types: dict[str, TaskType] = {}
        self._lock = threading.Lock()

    def add(self, task_type: TaskType) -> None:
        with self._lock:
            existing = self._types.get(task_type.name)
            if existing is not None and existing.run is not task_type.run:
                raise ValueError(f"task type {task_type.name!r} is registered twice")
            self._types[task_type.name] = task_type

    def get(self, name: str) -> TaskType:
        try:
            return self._types[name]
        except KeyError:
            known = ", ".join(sorted(self._types)) or "none"
            raise UnknownTaskType(f"unknown task type {name!r} (known: {known})", field="type") from None

    def names(self) -> list[str]:
        return sorted(self._types)

    def __contains__(self, name: object) -> bool:
        return name in self._types


_registry = Registry()


def get_registry() -> Registry:
    return _registry


def task_type(
    name: str, *, parameters: type[BaseModel] = AnyParameters, description: str = ""
) -> Callable[[Callable[[Any, TaskContext], Any]], Callable[[Any, TaskContext], Any]]:
    """Register ``run(params, ctx)`` as the task type ``name``; its return value (JSON) is the result."""

    def register(run: Callable[[Any, TaskContext], Any]) -> Callable[[Any, TaskContext], Any]:
        text = description or (run.__doc__ or "").strip()
        _registry.add(TaskType(name=name, run=run, parameters=parameters, description=text))
        return run

    return register
