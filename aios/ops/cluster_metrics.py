"""Cluster metrics: what the whole installation looks like, read from the database and the broker.

These are not per-process counters. Each scrape reads the shared state once — task totals rolled up
from the ledger (:mod:`aios.tasks.stats`), queue depths from the broker, agents, sync runs and
backups from their tables — so every API process (and ``aios metrics``) gives the same answer, and
nothing resets when a process restarts. Labels hold task types, states, queues, priority levels and
agent names; never a task id or a user.

A part that cannot be read (the broker is down, say) is left out of that scrape and counted in
``aios_scrape_errors_total{part}``; the rest is still served.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from typing import Any

from celery import Celery
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from aios.agents.health import AgentStatus
from aios.config import Settings
from aios.db import session_scope
from aios.models import Agent, Backup, SyncRun
from aios.tasks.stats import BUCKETS, FINISHED, read_stats, rollup
from aios.timeutil import utcnow

logger = logging.getLogger(__name__)


def _histogram(name: str, documentation: str, rows: list[Any]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["type"])
    for row in rows:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], row.buckets, strict=True):
            running += count
            cumulative.append((_bound(bound), running))
        family.add_metric([row.type], cumulative, sum_value=row.sum)
    return family


def _bound(text: str) -> str:
    return text if text == "+Inf" else repr(float(text))


class ClusterCollector(Collector):
    """A prometheus_client collector over AIOS's shared state (register it in a registry)."""

    def __init__(self, settings: Settings, celery: Celery | None) -> None:
        self.settings = settings
        self.celery = celery
        self.errors: dict[str, int] = {}
        self.lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        for part in (self._tasks, self._queues, self._agents, self._sync, self._backups):
            try:
                yield from list(part())
            except Exception as exc:  # noqa: BLE001 - one unreadable part must not hide the others
                name = part.__name__.lstrip("_")
                logger.warning("metrics: cannot read %s: %s", name, exc)
                with self.lock:
                    self.errors[name] = self.errors.get(name, 0) + 1
        errors = CounterMetricFamily("aios_scrape_errors", "Parts of a scrape that could not be read.", labels=["part"])
        with self.lock:
            for name, count in sorted(self.errors.items()):
                errors.add_metric([name], count)
        yield errors

    def _tasks(self) -> Iterator[Metric]:
        rollup(self.settings)
        rows = read_stats(self.settings)
        finished = CounterMetricFamily(
            "aios_tasks_finished", "Tasks that reached a final state, by type and state.", labels=["type", "state"]
        )
        for row in rows:
            if row.series.startswith(FINISHED):
                finished.add_metric([row.type, row.series[len(FINISHED) :]], row.count)
        yield finished
        yield _histogram(
            "aios_task_run_seconds",
            "Run time of task attempts, from start to end.",
            [row for row in rows if row.series == "run"],
        )
        yield _histogram(
            "aios_task_queue_wait_seconds",
            "Time tasks waited in a queue before an agent started them.",
            [row for row in rows if row.series == "wait"],
        )

    def _queues(self) -> Iterator[Metric]:
        if self.celery is None or not self.settings.broker.has_queue_depths:
            return
        from aios.broker.queues import describe_queues

        now = utcnow()
        depth = GaugeMetricFamily(
            "aios_queue_depth",
            "Messages waiting in a queue, by priority level (9 first).",
            labels=["queue", "priority"],
        )
        oldest = GaugeMetricFamily(
            "aios_queue_oldest_message_age_seconds",
            "Age of the oldest waiting message of a queue (0 when empty).",
            labels=["queue"],
        )
        for info in describe_queues(self.celery, self.settings):
            stamps = [level.oldest_published_at for level in info.levels if level.oldest_published_at]
            for level in info.levels:
                depth.add_metric([info.name, str(level.priority)], level.depth)
            oldest.add_metric([info.name], max(0.0, (now - min(stamps)).total_seconds()) if stamps else 0.0)
        yield depth
        yield oldest

    def _agents(self) -> Iterator[Metric]:
        with session_scope(self.settings.database) as session:
            rows = session.execute(select(Agent.name, Agent.status, Agent.resources)).all()
        by_state = collections.Counter(row.status for row in rows)  # the same rows feed the per-agent figures
        states = GaugeMetricFamily("aios_agents", "Registered agents, by health state.", labels=["state"])
        for state in AgentStatus:
            states.add_metric([state.value], by_state.get(state.value, 0))
        yield states
        cpu = GaugeMetricFamily(
            "aios_agent_cpu_percent", "CPU use of an agent host, from its last heartbeat.", labels=["agent"]
        )
        memory = GaugeMetricFamily(
            "aios_agent_memory_percent", "Memory use of an agent host, from its last heartbeat.", labels=["agent"]
        )
        for row in rows:
            resources = row.resources or {}
            if row.status == AgentStatus.OFFLINE.value:
                continue  # its last figures are stale; aios_agents says it is offline
            if isinstance(resources.get("cpu_pct"), int | float):
                cpu.add_metric([row.name], float(resources["cpu_pct"]))
            if isinstance(resources.get("memory_pct"), int | float):
                memory.add_metric([row.name], float(resources["memory_pct"]))
        yield cpu
        yield memory

    def _sync(self) -> Iterator[Metric]:
        with session_scope(self.settings.database) as session:
            total = session.scalar(select(func.count()).select_from(SyncRun)) or 0
            # Errors are a JSON list: look at the recent runs (bounded) rather than compare JSON in SQL.
            recent = session.execute(
                select(SyncRun.started_at, SyncRun.duration_s, SyncRun.errors).order_by(SyncRun.id.desc()).limit(100)
            ).all()
        runs = CounterMetricFamily("aios_sync_runs", "Runs of the sync job.")
        runs.add_metric([], total)
        yield runs
        last_errors = GaugeMetricFamily("aios_sync_last_run_errors", "Errors of the latest sync run.")
        last_errors.add_metric([], len(recent[0].errors or []) if recent else 0)
        yield last_errors
        good = next((run for run in recent if not run.errors), None)
        success = GaugeMetricFamily(
            "aios_sync_last_success_timestamp_seconds",
            "Unix time of the end of the last sync run without errors (0: none yet).",
        )
        success.add_metric([], good.started_at.timestamp() + good.duration_s if good else 0.0)
        yield success

    def _backups(self) -> Iterator[Metric]:
        with session_scope(self.settings.database) as session:
            by_status = dict(session.execute(select(Backup.status, func.count()).group_by(Backup.status)).all())
            last_ok = session.scalar(select(func.max(Backup.created_at)).where(Backup.status.in_(["ok", "deleted"])))
        backups = CounterMetricFamily("aios_backups", "Database backups attempted, by outcome.", labels=["status"])
        backups.add_metric(["ok"], by_status.get("ok", 0) + by_status.get("deleted", 0))
        backups.add_metric(["failed"], by_status.get("failed", 0))
        yield backups
        success = GaugeMetricFamily(
            "aios_last_good_backup_timestamp_seconds", "Unix time of the last successful database backup (0: none yet)."
        )
        success.add_metric([], last_ok.timestamp() if last_ok else 0.0)
        yield success


def serve(settings: Settings) -> None:
    """``aios metrics``: the cluster metrics alone, on ``metrics.host:metrics.port``, until SIGTERM.

    One scrape target for the whole installation, independent of the API (scrape this, or the API's
    ``/metrics``, not both: the cluster part is the same in each).
    """
    import signal
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app

    from aios.broker.celery_app import create_celery_app
    from aios.db import ensure_migrated

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
            logger.debug("metrics: " + format, *args)

    ensure_migrated(settings.database)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(settings, create_celery_app(settings)))
    server = make_server(
        settings.metrics.host, settings.metrics.port, make_wsgi_app(registry), handler_class=QuietHandler
    )
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown, daemon=True).start())
    logger.warning("serving cluster metrics on http://%s:%d/metrics", settings.metrics.host, settings.metrics.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
