"""What a task type raises to end its run: signals for task authors, not errors of AIOS.

They are apart from :mod:`aios.errors` (the HTTP error tree): a handler raises them on purpose and the
runner records them on the task, they never become an API answer. Like Temporal's ``ApplicationError``
(``non_retryable``), a signal says how the run ends, not that something went wrong in AIOS.
"""

from __future__ import annotations

from typing import Any


class TaskSignal(Exception):
    """Base of the signals a task type may raise; the message becomes the task's ``error``."""

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.message = message
        #: Stored on the task too (a command's exit code and output): JSON, like a return value.
        self.result = result


class TaskFailure(TaskSignal):
    """Fail without retrying (bad input found only at run time): the task ends FAILED at once.

    The task's ``error`` is the message itself (start it with a reason code, e.g. ``not_allowed: ...``);
    ``result``, if given, is stored on the FAILED task too (a command's exit code and output).
    """


class TaskTimedOut(TaskFailure):
    """Raised by a task type that enforces its own time limit (a command's wall time): the task ends
    TIMED_OUT, not FAILED, with ``result`` (what it produced until then) stored."""
