"""Progress reported by a running task: checked, rate-limited, fenced, and put on the timeline.

A handler calls ``ctx.progress(40, "copying")``; the report lands in two places, in one transaction:
the task row (``progress``, ``progress_message``: the latest figure, what ``GET /tasks/<id>`` shows)
and a ``task_events`` note ``{"progress": 40, "message": "copying"}`` (the history, what the event
streams of :mod:`webapi.events` deliver).

Promises:

* **Fenced.** The write is ``UPDATE tasks ... WHERE id = :id AND dispatch_id = :dispatch AND state =
  'RUNNING'``: a run that was fenced off (cancelled, timed out, re-routed, superseded by a retry)
  changes nothing, and its later reports are not even tried. ``progress()`` returns False then, so a
  handler may stop early.
* **Rate-limited.** At most one write per ``tasks.progress_interval_s`` (0.2 s) per run. A report in
  between is held; the latest held report is written by the next report after the interval, or when
  the run ends (:meth:`ProgressReporter.flush`, called by the runner). 100 % is always written at once.
* **Never fatal to the task.** A database error while writing is logged and the report held for the
  next try; only a bad value (not a number in 0..100) raises, as that is a bug in the handler.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from aios.config import Settings
from aios.db import session_scope
from aios.errors import ValidationFailed
from aios.models import Task
from aios.tasks.states import TaskState, record_events

logger = logging.getLogger(__name__)

#: Longest progress message kept (longer ones are cut, not refused: a message is informative only).
MESSAGE_MAX_CHARS = 500


def check_progress(percent: Any, message: Any = None) -> tuple[float, str | None]:
    """Return ``(percent, message)`` as stored, or raise ValidationFailed naming the bad value."""
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise ValidationFailed(f"progress percent must be a number from 0 to 100, not {percent!r}", field="percent")
    value = float(percent)
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise ValidationFailed(f"progress percent must be from 0 to 100, not {percent!r}", field="percent")
    if message is not None and not isinstance(message, str):
        raise ValidationFailed(f"progress message must be a string, not {type(message).__name__}", field="message")
    return value, (message[:MESSAGE_MAX_CHARS] if message is not None else None)


def record_progress(
    settings: Settings, task_id: str, dispatch_id: str, percent: float, message: str | None, *, actor: str
) -> bool:
    """Write one report if the run still holds the task (RUNNING on ``dispatch_id``); False if fenced off."""
    with session_scope(settings.database) as session:
        moved = session.execute(
            update(Task)
            .where(Task.id == task_id, Task.dispatch_id == dispatch_id, Task.state == TaskState.RUNNING.value)
            .values(progress=percent, progress_message=message)
            .returning(Task.id)
        ).first()
        if moved is None:
            return False
        record_events(
            session,
            [task_id],
            actor=actor,
            from_state=None,
            to_state=None,
            detail={"progress": percent, "message": message},
        )
    return True


class ProgressReporter:
    """The progress of one run: its rate limit, the report held back by it, and whether it was fenced off.

    Thread-safe: a handler may report from threads of its own.
    """

    def __init__(
        self,
        settings: Settings,
        task_id: str,
        dispatch_id: str,
        *,
        actor: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.task_id, self.dispatch_id, self.actor = settings, task_id, dispatch_id, actor
        self.interval_s = settings.tasks.progress_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_write: float | None = None
        self._held: tuple[float, str | None] | None = None
        #: Set once a write found the task no longer ours; nothing is written after that.
        self.fenced_off = False
        #: Reports written (for tests and logs).
        self.writes = 0

    def report(self, percent: float, message: str | None) -> bool:
        """Record (or hold) one checked report; False once the run has been fenced off."""
        with self._lock:
            if self.fenced_off:
                return False
            now = self._clock()
            due = self._last_write is None or now - self._last_write >= self.interval_s
            if percent >= 100.0 or due:
                self._write(percent, message, now)
            else:
                self._held = (percent, message)
            return not self.fenced_off

    def flush(self) -> bool:
        """Write the held report, if any (the runner calls this when the handler returns or raises)."""
        with self._lock:
            if self._held is not None and not self.fenced_off:
                self._write(*self._held, self._clock())
            return not self.fenced_off

    def _write(self, percent: float, message: str | None, now: float) -> None:
        try:
            written = record_progress(self.settings, self.task_id, self.dispatch_id, percent, message, actor=self.actor)
        except SQLAlchemyError:
            logger.warning(
                "could not record progress %.1f of task %s; will try again", percent, self.task_id, exc_info=True
            )
            self._held = (percent, message)
            return
        self._held = None
        self._last_write = now
        if written:
            self.writes += 1
        else:
            self.fenced_off = True
            logger.info(
                "progress of task %s ignored: this run (dispatch %s) no longer holds it", self.task_id, self.dispatch_id
            )
