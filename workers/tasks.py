"""The one Celery task an agent runs, and the request class that notices lost runs.

Thin on purpose: decode the message, call :func:`workers.runner.execute`, done.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Celery
from celery.exceptions import WorkerLostError
from celery.worker.request import Request

from aios.broker.celery_app import RUN_TASK_NAME
from aios.config import Settings
from aios.ops.log import task_id_var
from aios.recovery.lost_runs import record_cancelled_run
from aios.tasks.states import TaskState
from workers.runner import execute, record_lost_run

logger = logging.getLogger(__name__)


class AiosRequest(Request):
    """Records in the database what the pool child could not: hard timeouts and lost processes
    (:func:`workers.runner.record_lost_run`), and runs Celery cancelled on a broker connection loss
    (:func:`aios.recovery.lost_runs.record_cancelled_run`)."""

    def _aios_settings(self) -> Settings:
        return self.task.app.aios_settings  # type: ignore[no-any-return]

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            self._record_lost(f"timed out: killed after {timeout:g}s (hard time limit)", TaskState.TIMED_OUT)

    def on_failure(self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False) -> None:
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, WorkerLostError) and not self._already_cancelled:
            self._record_lost(f"worker lost: {exc}", None)

    def cancel(self, pool: Any, signal: Any = None, emit_retry: bool = True) -> None:
        """Celery cancels the runs in hand when the broker connection is lost: it terminates the pool
        process and leaves the message for the broker to deliver again, which a Redis without
        persistence cannot do. The ledger settles the run here and now: the pool's failure callback
        would come only after the consumer reconnected, and the consumer may retry for minutes."""
        super().cancel(pool, signal=signal, emit_retry=emit_retry)
        if self._already_cancelled and not self._already_revoked:
            self._record_cancelled()

    def _record_cancelled(self) -> None:
        dispatch_id = (self.kwargs or {}).get("dispatch_id")
        if not dispatch_id:
            return
        try:
            record_cancelled_run(self._aios_settings(), self.id, dispatch_id, self.hostname)
        except Exception:  # noqa: BLE001 - the main process must survive; the sync job repairs it later
            logger.exception("could not record the cancelled run of task %s", self.id)

    def _record_lost(self, reason: str, target: TaskState | None) -> None:
        dispatch_id = (self.kwargs or {}).get("dispatch_id")
        if not dispatch_id:
            return
        try:
            record_lost_run(self.task.app, self._aios_settings(), self.id, dispatch_id, self.hostname, reason, target)
        except Exception:  # noqa: BLE001 - the main process must survive; sync repairs it later
            logger.exception("could not record the lost run of task %s", self.id)


def register_tasks(app: Celery, settings: Settings) -> Any:
    """Attach ``aios.run`` to ``app``; returns the task."""

    @app.task(
        name=RUN_TASK_NAME,
        bind=True,
        Request=AiosRequest,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        typing=False,
    )
    def run(self: Any, dispatch_id: str | None = None, **_ignored: Any) -> None:
        if not dispatch_id:
            logger.warning("message for task %s carries no dispatch_id; dropped", self.request.id)
            return
        token = task_id_var.set(self.request.id)  # every log line of this run carries the task id
        try:
            execute(self.app, settings, self.request.id, dispatch_id, self.request.hostname)
        finally:
            task_id_var.reset(token)

    return run
