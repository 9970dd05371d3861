"""``aios beat``: Celery beat with AIOS's schedule, behind a leader lease.

Any number of beat processes may run (a primary and standbys); only the holder of the ``beat`` lease
(:mod:`aios.timing.lease`) runs jobs. The leader renews the lease every third of its TTL; if it dies, a
standby takes over within ``beat.lock_ttl_s``. Two beats never both run a job: besides the lease,
every job is idempotent and every schedule slot is fired by one conditional UPDATE.

The jobs run inside the beat process, not on agents: the sync job must run precisely when agents are
dead or the broker is down. They run on a small thread pool, one at a time per job, so a slow sync
run never delays the one-second tick that starts scheduled tasks on time.

Jobs:

* ``tick`` (every ``beat.tick_s``): start SCHEDULED tasks whose time came; fire due periodic schedules.
* ``sync`` (every ``orchestrator.sync_interval_s``): the reconciliation job (:mod:`aios.recovery.sync`).
* ``backup`` (on ``backup.schedule``, a cron expression): a database backup (:mod:`aios.ops.backup`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from celery import Celery
from celery.beat import ScheduleEntry, Scheduler

from aios.config import Settings
from aios.models import Schedule
from aios.tasks.spec import TaskSpec
from aios.tasktypes import get_registry
from aios.timing import lease

logger = logging.getLogger(__name__)

LEASE_NAME = "beat"
Job = Callable[[Celery, Settings, str], Any]


def spec_for(schedule: Schedule) -> TaskSpec:
    """The task a schedule fires, re-validated against the task types this beat knows."""
    stored = dict(schedule.task)
    params = get_registry().get(stored["type"]).validate(stored.get("parameters") or {})
    stored["parameters"] = params.model_dump(mode="json")
    return TaskSpec(**stored, owner=schedule.owner)


def _tick(celery: Celery, settings: Settings, holder: str) -> None:
    from aios.timing.delayed import dispatch_due
    from aios.timing.periodic import fire_due

    dispatch_due(celery, settings)
    fire_due(celery, settings, spec_for)


def _sync(celery: Celery, settings: Settings, holder: str) -> None:
    from aios.recovery.sync import run_sync

    run_sync(celery, settings, runner=f"beat:{holder}")


def _backup(celery: Celery, settings: Settings, holder: str) -> None:
    from aios.ops.backup import create_backup

    create_backup(settings)


JOBS: dict[str, Job] = {"aios.beat.tick": _tick, "aios.beat.sync": _sync, "aios.beat.backup": _backup}


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {
        "tick": {"task": "aios.beat.tick", "schedule": timedelta(seconds=settings.beat.tick_s)},
        "sync": {"task": "aios.beat.sync", "schedule": timedelta(seconds=settings.orchestrator.sync_interval_s)},
    }
    backup = getattr(settings, "backup", None)
    if backup is not None and getattr(backup, "schedule", None):
        from aios.timing.cron import parse_cron

        entries["backup"] = {"task": "aios.beat.backup", "schedule": parse_cron(backup.schedule)}
    return entries


class LeaderScheduler(Scheduler):  # type: ignore[misc]  # celery ships no types: Scheduler is Any
    """A Celery beat scheduler that runs AIOS's jobs in-process, only while it holds the lease."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.settings: Settings = kwargs["app"].aios_settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.leader = False
        self.lease_checked_at = 0.0
        self.pool = ThreadPoolExecutor(max_workers=len(JOBS), thread_name_prefix="aios-beat")
        self.running: dict[str, threading.Lock] = {name: threading.Lock() for name in JOBS}
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        self.merge_inplace(beat_schedule(self.settings))

    # --- leadership -------------------------------------------------------------------------
    def check_lease(self) -> bool:
        ttl = self.settings.beat.lock_ttl_s
        now = time.monotonic()
        if now - self.lease_checked_at >= ttl / 3 or not self.leader:
            self.lease_checked_at = now
            try:
                leader = lease.acquire(self.settings, LEASE_NAME, self.holder, ttl)
            except Exception as exc:  # noqa: BLE001 - no database: nobody can lead safely
                logger.warning("beat cannot reach the database to hold its lease: %s", exc)
                leader = False
            if leader != self.leader:
                logger.warning("beat %s is now %s", self.holder, "the LEADER" if leader else "a standby")
            self.leader = leader
        return self.leader

    def tick(self, *args: Any, **kwargs: Any) -> float:
        if not self.check_lease():
            return min(1.0, self.settings.beat.lock_ttl_s / 3)
        due_in_s: float = super().tick(*args, **kwargs)  # celery's: seconds until the next entry is due
        return min(due_in_s, self.settings.beat.tick_s)

    # --- running jobs in-process ------------------------------------------------------------
    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        job = JOBS.get(entry.task)
        if job is None:
            logger.error("beat entry %s names no AIOS job (%s)", entry.name, entry.task)
            return
        gate = self.running[entry.task]
        if not gate.acquire(blocking=False):
            logger.info("beat job %s is still running; this period is skipped", entry.name)
            return

        def run() -> None:
            started = time.monotonic()
            try:
                job(self.app, self.settings, self.holder)
            except Exception:  # noqa: BLE001 - a failing job is logged and runs again next period
                logger.exception("beat job %s failed", entry.name)
            finally:
                gate.release()
                logger.debug("beat job %s took %.3fs", entry.name, time.monotonic() - started)

        self.pool.submit(run)

    def apply_async(self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any) -> None:
        self.apply_entry(entry, producer)

    def close(self) -> None:
        super().close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.leader:
            try:
                lease.release(self.settings, LEASE_NAME, self.holder)
            except Exception:  # noqa: BLE001
                logger.exception("could not release the beat lease")


def run_beat(settings: Settings) -> None:
    """Run beat in the foreground until SIGTERM/SIGINT."""
    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated
    from aios.tasktypes import load_task_types

    ensure_migrated(settings.database)
    load_task_types(settings.tasks.modules)
    app = create_celery_app(settings)
    app.conf.beat_max_loop_interval = settings.beat.tick_s
    app.Beat(
        scheduler=LeaderScheduler, max_interval=settings.beat.tick_s, loglevel=settings.logging.level, quiet=True
    ).run()
